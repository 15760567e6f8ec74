"""Stage 1, supervised fine-tuning (Ouyang et al. 2022, §3.5, App. C.1), and stage 0, pretraining.

``train(config, workdir)`` runs either.

The objective is ``losses.lm_loss``. With ``data.kind='demos'`` the loss covers the response and its
EOS (the prompt is masked unless ``data.prompt_in_loss``); with ``data.kind='pretrain'`` it is plain
language modelling on packed text, which builds the synthetic world's base model. ``data.ptx_fraction``
mixes pretraining sequences into every SFT batch (the paper's PPO-init SFT: 10%), with the loss the
token mean over both.

Checkpoint selection: every evaluation records ``val_loss`` and, when ``score_fn(params)`` is given
(mean RM score on validation prompts once the RM exists, as the paper selects; or the gold score in the
synthetic world), its score. The best by ``config.select_by`` is kept in ``workdir/best``.

Rerunning the same command resumes from ``workdir/checkpoints`` exactly: params, optimizer, step, RNG,
data iterators and the best-so-far.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from instructjax import checkpoint, configlib, loop, losses, metrics, optim, sharding, stage, steps, workdir_lock
from instructjax.data import pipeline, tfds_builder
from instructjax.model import ModelConfig, Transformer, count_params, unembedding


@dataclasses.dataclass
class Data:
    """A supervised stage's data: the training iterators (checkpointed), the validation batches, the size of
    an epoch in examples (rows for packed pretraining), the pretraining rows mixed into each step, and the
    text format (whose ``stats`` count truncations)."""

    iters: dict[str, Any]
    eval_batches: list[dict]
    train_size: int
    ptx_rows: int
    fmt: pipeline.TextFormat


def check_config(config: Any, score_fn: Callable | None = None) -> None:
    """Refuse a config that cannot run, before anything is built or compiled, naming the key."""
    sizes = ("batch_size", "eval_batch_size", "data.max_len", "optim.grad_accum_steps", "loss_chunk")
    configlib.check_positive(config, sizes)
    configlib.check_positive(config, ("optim.lr",), allow_zero=("optim.lr",))  # 0 freezes the params (tests do)
    counts = ("num_epochs", "num_steps", "data.ptx_fraction")
    configlib.check_positive(config, counts, allow_zero=counts)
    if not config.num_steps and not config.num_epochs:
        raise ValueError("config.num_epochs and config.num_steps are both 0: set one (num_steps > 0 overrides)")
    if not 0 <= config.data.ptx_fraction < 1:
        raise ValueError(f"config.data.ptx_fraction={config.data.ptx_fraction} must be in [0, 1)")
    if config.select_by not in ("val_loss", "score") or (config.select_by == "score" and score_fn is None):
        raise ValueError(f"config.select_by={config.select_by!r}: 'val_loss', or 'score' with a score_fn")
    if config.data.kind not in ("demos", "pretrain"):
        raise ValueError(f"config.data.kind={config.data.kind!r}: expected 'demos' or 'pretrain'")


def train(config: Any, workdir: str | pathlib.Path, score_fn: Callable[[Any], float] | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint; returns the final summary (also written to ``summary.json``)."""
    # ----------------------------------------------------------------- Set-up: config, workdir, mesh, tokenizer
    wall_start = time.perf_counter()
    check_config(config, score_fn)
    cfg = ModelConfig.from_dict(config.model)
    stage.check_lengths(cfg, "model", {"config.data.max_len": config.data.max_len})
    with workdir_lock.hold(workdir):  # one run per workdir, released however the stage ends
        opened = stage.open_stage(config, workdir, vocab_size=cfg.vocab_size)
        mesh, rules = opened.mesh, opened.rules
        model = Transformer(cfg)

        # ----------------------------------------------------------------- Data
        data = make_data(config, opened)
        if config.data.kind == "demos":  # packed pretraining rows are full by construction
            stage.report_padding(opened.workdir.name, data.eval_batches, config.data.max_len)
        accum = config.optim.grad_accum_steps
        total_steps = config.num_steps or math.ceil(config.num_epochs * data.train_size / (config.batch_size * accum))

        # ----------------------------------------------------------------- Model, optimizer, sharded state
        tx = optim.make_optimizer(config.optim, total_steps)
        example = np.zeros((1, config.data.max_len), np.int32)
        state, state_sh = steps.create_train_state(
            lambda r: model.init(r, example)["params"], tx, mesh, rules, config.seed
        )
        n_params = count_params(state.params)
        if config.init_from:
            state = state.replace(params=checkpoint.load_params(config.init_from, state.params, state_sh.params))

        # ----------------------------------------------------------------- Steps
        loss_fn = make_loss_fn(model, cfg, config)
        train_step = steps.make_train_step(loss_fn, tx, state_sh, config.nan_policy)
        eval_step = steps.make_eval_step(loss_fn, state_sh.params)

        def next_batch():
            batch = next(data.iters["train"])
            if "ptx" in data.iters:
                batch.update({f"ptx_{k}": v for k, v in next(data.iters["ptx"]).items()})
            return sharding.to_global(batch, mesh, rules)

        def evaluate(params) -> dict[str, float]:
            total = count = 0.0
            for batch in data.eval_batches:
                out = eval_step(params, sharding.to_global(batch, mesh, rules))
                total += float(out["loss"]) * float(out["loss_tokens"])
                count += float(out["loss_tokens"])
            result = {"val_loss": total / max(count, 1.0)}
            if score_fn is not None:
                result["score"] = float(score_fn(params))
            return result

        # ----------------------------------------------------------------- Train loop (instructjax/loop.py)
        settings = loop.settings(
            config,
            total_steps=total_steps,
            select=("score", "max") if config.select_by == "score" else ("val_loss", "min"),
            micro_steps=accum,
            flops_per_token=metrics.training_flops_per_token(cfg, config.data.max_len),
        )
        with sharding.use(mesh, rules):
            result = loop.run(
                settings,
                opened.workdir,
                state=state,
                state_shardings=state_sh,
                iters=data.iters,
                step_fn=lambda state: train_step(state, next_batch()),
                evaluate=evaluate,
                start_info={"params": n_params, "ptx_share": data.ptx_rows / (data.ptx_rows + config.batch_size)},
                lr_fn=optim.lr_schedule(config.optim, total_steps),
                started_at=wall_start,
            )

        # ----------------------------------------------------------------- Finish
        summary = loop.summary(result, total_steps, accum, params=n_params, truncation=data.fmt.stats.as_dict())
        return stage.close_stage(opened.workdir, summary)


def make_data(config: Any, opened: stage.Opened) -> Data:
    """The TFDS sources and grain iterators of an SFT stage (``data.kind='demos'``, with ``data.ptx_fraction``'s
    pretraining rows beside each batch) or of stage 0's packed pretraining text (``data.kind='pretrain'``)."""
    mesh, rules, paths, tokenizer = opened.mesh, opened.rules, opened.paths, opened.tokenizer
    world, cache, d = paths.world, paths.cache, config.data
    fmt = pipeline.TextFormat(tokenizer, d.max_len, d.max_prompt_len, d.prompt_template, d.prompt_in_loss)
    batch_size = config.batch_size
    sharding.check_batch_size("config.batch_size", batch_size, mesh, rules)
    sharding.check_batch_size("config.eval_batch_size", config.eval_batch_size, mesh, rules)
    block = sharding.batch_block(mesh, rules)  # this process's rows of every batch

    def packed(source, rows: int, seed: int):  # packed pretraining rows of max_len tokens
        return pipeline.pretrain_batches(source, tokenizer, d.max_len, rows, seed, counter=fmt.counter, shard=block)

    ptx_rows = 0
    if d.kind == "pretrain":
        files = {"train": world / d.pretrain_file, "valid": world / d.pretrain_valid_file}
        src = tfds_builder.build("pretrain", files, cache, d.skip_bad)
        iters = {"train": iter(packed(src["train"], batch_size, config.seed))}
        eval_batches = list(_take(iter(packed(src["valid"], config.eval_batch_size, 12345)), config.eval_batches or 8))
        # A packed row holds several documents: count epochs in tokens, approximated by documents per row.
        train_size = math.ceil(len(src["train"]) / max(1.0, _docs_per_row(eval_batches)))
    else:
        files = {"train": world / d.train_file, "valid": world / d.valid_file}
        src = tfds_builder.build("demos", files, cache, d.skip_bad)
        iters = {"train": iter(pipeline.sft_batches(src["train"], fmt, batch_size, config.seed, shard=block))}
        eval_batches = list(
            pipeline.sft_batches(src["valid"], fmt, config.eval_batch_size, 0, shuffle=False, num_epochs=1, shard=block)
        )
        train_size = len(src["train"])
        if d.ptx_fraction > 0:
            # Pretraining rows per step, rounded up to whole batch shards; the share used is logged.
            ptx_rows = ptx_rows_per_step(batch_size, d.ptx_fraction, sharding.batch_divisor(mesh, rules))
            ptx_src = tfds_builder.build("pretrain", {"train": world / d.pretrain_file}, cache)["train"]
            iters["ptx"] = iter(packed(ptx_src, ptx_rows, config.seed + 1))
    return Data(iters, eval_batches, train_size, ptx_rows, fmt)


def make_loss_fn(model: Transformer, cfg: ModelConfig, config: Any) -> steps.LossFn:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` of ``steps.make_train_step``: the token-mean LM loss
    of the batch (``mask``, or ``segment_ids`` for packed pretraining). With ``ptx_*`` keys (PPO-init SFT):

        L = (1 − f)·L_demos + f·L_pretrain,    f = config.data.ptx_fraction,

    each term a token mean. The paper mixes in "10% pretraining data" (App. C.3) without saying 10% of what;
    we take it as 10% of the objective, so the share does not depend on how long the responses are against
    the packed pretraining rows (a token mean over both made the tiny world's 32-token rows 57% of the loss
    tokens, docs/results.md). ``rng=None``: no dropout (evaluation)."""

    def lm_nll(params, tokens, loss_mask, rngs, **inputs):
        # The LM head and cross-entropy fused in chunks: the [B,T,V] logits never exist at once.
        hidden = model.apply(
            {"params": params}, tokens, **inputs, deterministic=rngs is None, rngs=rngs, return_hidden=True
        )
        return losses.fused_lm_loss(hidden, unembedding(params, cfg), tokens, loss_mask, config.loss_chunk)

    def loss_fn(params, batch, rng):
        rngs = None if rng is None else {"dropout": rng}
        if "segment_ids" in batch:
            loss, n_tokens = lm_nll(
                params, batch["tokens"], batch["loss_mask"], rngs, segment_ids_bt=batch["segment_ids"]
            )
        else:
            # SFT rows are right-padded (pipeline.sft_batches): on a GPU the attention can take the fused kernel
            mask = batch["mask"]
            loss, n_tokens = lm_nll(params, batch["tokens"], batch["loss_mask"], rngs, mask_bt=mask, right_padded=True)
        # loss_tokens weight the loss; real_tokens (non-pad) and computed_tokens (B*T) measure throughput.
        out = {"loss_tokens": n_tokens, "real_tokens": batch["mask"].sum(), "computed_tokens": batch["tokens"].size}
        if "ptx_tokens" in batch:  # PPO-init SFT: the pretraining text is ptx_fraction of the objective
            ptx_rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, 1)}
            ptx_loss, ptx_tokens = lm_nll(
                params, batch["ptx_tokens"], batch["ptx_loss_mask"], ptx_rngs, segment_ids_bt=batch["ptx_segment_ids"]
            )
            out.update(sft_loss=loss, ptx_loss=ptx_loss, loss_tokens=n_tokens + ptx_tokens)
            out["real_tokens"] += batch["ptx_mask"].sum()
            out["computed_tokens"] += batch["ptx_tokens"].size
            loss = (1 - config.data.ptx_fraction) * loss + config.data.ptx_fraction * ptx_loss
        return loss, out

    return loss_fn


def ptx_rows_per_step(batch_size: int, ptx_fraction: float, batch_divisor: int) -> int:
    """Pretraining rows beside ``batch_size`` demonstrations so they are ``ptx_fraction`` of the sequences,
    rounded up to whole batch shards (``batch_divisor``); 0 without a mix."""
    if ptx_fraction <= 0:
        return 0
    rows = math.ceil(batch_size * ptx_fraction / (1 - ptx_fraction))
    return batch_divisor * math.ceil(rows / batch_divisor)


def _take(it, n):
    for _ in range(n):
        yield next(it)


def _docs_per_row(batches: list[dict]) -> float:
    return float(np.mean([b["segment_ids"].max(axis=1).mean() for b in batches]))
