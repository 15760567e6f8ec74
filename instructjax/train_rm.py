"""Stage 2, the reward model (Ouyang et al. 2022, §3.5, App. C.2): ``train(config, workdir)``.

The model is the SFT transformer with the unembedding replaced by a scalar head initialised
N(0, 1/(d_model+1)) (``config.init_from`` names the SFT workdir; every other parameter is copied). The
reward of a sequence is the head's output at its EOS token (``scoring.last_token``; the paper leaves the
token open).

Batching as in the paper: one batch element is one prompt with all its K ranked completions (K forward
passes), and ``losses.ranking_loss`` averages -log σ(r_w - r_l) over the prompt's valid pairs (ties dropped)
and then over prompts. ``data.pairs_as_examples`` gives the §3.5 ablation instead: every pair its own
element, shuffled across the dataset (an epoch is then a pass over the pairs). Validation always uses the
grouped form, so both variants are measured the same way.

Packed batches (``data.pack_rows = R > 0``): padding every prompt to ``k_max`` completions spends the forward
pass on empty rows (28% of it for K uniform in 4..9, 39% for 2..9). With ``pack_rows`` the training batches
are ``pipeline.packed_comparison_batches`` instead: R completion rows holding as many whole prompts as fit, in
the same shuffled order, with a per-prompt index of their rows (``slots``). The loss gathers the rows' rewards
into the padded [prompts, K] layout and is the same ``losses.ranking_loss`` (same value and gradient as the
padded batch of those prompts, tested), so only the forward pass shrinks: one shape, one compiled step, under
10% padding rows. The number of prompts per step then varies (about R / mean K; ``batch_size`` is unused for
training), so the steps differ from the padded run's; the padded layout stays the default, and validation
stays padded.

Validation metrics: ``val_loss`` (the grouped log loss), ``val_accuracy`` (pairs ordered as the labelers
ordered them), the reward mean and std, and, when the data comes from the synthetic world (``world.json``
beside it), ``val_gold_accuracy``: pairs ordered as the gold score orders them (gold ties skipped).

After the last step, the mean raw reward of the SFT demonstrations (``data.demos_file``) under the
selected (best validation loss) params is written to ``reward_bias.json``; ``reward.load_reward_model``
subtracts it (§3.5), so the demonstrations score 0 on average.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from instructjax import (
    checkpoint,
    configlib,
    loop,
    losses,
    metrics,
    optim,
    reward,
    scoring,
    sharding,
    stage,
    steps,
    workdir_lock,
)
from instructjax.data import formats, pipeline, tfds_builder, world_tasks
from instructjax.model import ModelConfig, Transformer, count_params


@dataclasses.dataclass
class Data:
    """The RM's data: the training iterator (checkpointed), the validation batches (with ``gold_pair_mask`` in
    the synthetic world), the examples per epoch, the text format (whose ``stats`` count truncations) and,
    packed, the batches per epoch."""

    iters: dict[str, Any]
    eval_batches: list[dict]
    train_size: int
    fmt: pipeline.TextFormat
    packed_batches: int = 0  # with data.pack_rows: the batches of the first epoch (the steps of an epoch)


def train(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train, evaluate, checkpoint and normalise the RM; returns the summary (also ``summary.json``)."""
    # ----------------------------------------------------------------- Set-up: config, workdir, mesh, tokenizer
    wall_start = time.perf_counter()
    cfg = ModelConfig.from_dict(config.model)
    if cfg.head != "scalar":
        raise ValueError(f"config.model.head={cfg.head!r}: a reward model needs head='scalar'")
    check_config(config)
    stage.check_lengths(cfg, "model", {"config.data.max_len": config.data.max_len})
    with workdir_lock.hold(workdir):  # one run per workdir, released however the stage ends
        opened = stage.open_stage(config, workdir, vocab_size=cfg.vocab_size)
        mesh, rules = opened.mesh, opened.rules
        model = Transformer(cfg)

        # ----------------------------------------------------------------- Data
        data = make_data(config, opened)
        stage.report_padding(opened.workdir.name, data.eval_batches, config.data.max_len)
        accum = config.optim.grad_accum_steps
        if data.packed_batches:  # a packed epoch is the batches its prompts filled
            total_steps = config.num_steps or math.ceil(config.num_epochs * data.packed_batches / accum)
        else:
            total_steps = config.num_steps or math.ceil(
                config.num_epochs * data.train_size / (config.batch_size * accum)
            )

        # ----------------------------------------------------------------- Model, optimizer, sharded state
        tx = optim.make_optimizer(config.optim, total_steps)
        example = np.zeros((1, config.data.max_len), np.int32)
        state, state_sh = steps.create_train_state(
            lambda r: model.init(r, example)["params"], tx, mesh, rules, config.seed
        )
        n_params = count_params(state.params)
        if config.init_from:
            state = state.replace(params=_from_policy(config.init_from, state.params, cfg, mesh, rules))

        # ----------------------------------------------------------------- Steps
        loss_fn = make_loss_fn(model)
        train_step = steps.make_train_step(loss_fn, tx, state_sh, config.nan_policy)
        eval_step = steps.make_eval_step(loss_fn, state_sh.params)
        evaluate = lambda params: validation_metrics(eval_step, params, data.eval_batches, mesh, rules)

        # ----------------------------------------------------------------- Train loop (instructjax/loop.py)
        settings = loop.settings(
            config,
            total_steps=total_steps,
            select=("val_loss", "min"),
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
                step_fn=lambda state: train_step(state, sharding.to_global(next(data.iters["train"]), mesh, rules)),
                evaluate=evaluate,
                start_info={"params": n_params, "train_examples": data.train_size},
                lr_fn=optim.lr_schedule(config.optim, total_steps),
                started_at=wall_start,
            )

        # ----------------------------------------------------------------- Bias normalisation (§3.5)
        bias = None
        if result.status == "done":
            best = checkpoint.load_params(opened.workdir, result.state.params, state_sh.params, best=True)
            demos_file = opened.paths.world / config.data.demos_file
            demos = tfds_builder.build("demos", {"train": demos_file}, opened.paths.cache, config.data.skip_bad)
            bias = _mean_demo_reward(model, best, demos["train"], data.fmt, config.eval_batch_size, mesh, rules)
            if jax.process_index() == 0:
                info = {"bias": bias, "demonstrations": len(demos["train"]), "file": config.data.demos_file}
                (opened.workdir / reward.BIAS_FILE).write_text(json.dumps(info, indent=1) + "\n")

        # ----------------------------------------------------------------- Finish
        summary = loop.summary(
            result, total_steps, accum, params=n_params, bias=bias, truncation=data.fmt.stats.as_dict()
        )
        return stage.close_stage(opened.workdir, summary)


def check_config(config: Any) -> None:
    """Refuse a config that cannot run, before anything is built or compiled, naming the key."""
    keys = ("batch_size", "eval_batch_size", "data.max_len", "data.k_max", "optim.grad_accum_steps")
    configlib.check_positive(config, keys)
    configlib.check_positive(config, ("optim.lr",), allow_zero=("optim.lr",))  # 0 freezes the params (tests do)
    configlib.check_positive(config, ("num_epochs", "num_steps"), allow_zero=("num_epochs", "num_steps"))
    if not config.num_steps and not config.num_epochs:
        raise ValueError("config.num_epochs and config.num_steps are both 0: set one (num_steps > 0 overrides)")
    if config.data.k_max < 2:
        raise ValueError(f"config.data.k_max={config.data.k_max}: a ranking compares at least 2 completions")
    pack_rows = config.data.get("pack_rows", 0)
    if pack_rows < 0:
        raise ValueError(f"config.data.pack_rows={pack_rows}: 0 (padded batches) or the completion rows of a batch")
    if pack_rows and config.data.pairs_as_examples:
        raise ValueError("config.data.pack_rows with config.data.pairs_as_examples: pairs are never padded, unset one")
    if 0 < pack_rows < config.data.k_max:
        raise ValueError(
            f"config.data.pack_rows={pack_rows} < config.data.k_max={config.data.k_max}: a prompt must fit"
        )


def make_data(config: Any, opened: stage.Opened) -> Data:
    """The comparison sources and grain iterators: one prompt with all K completions per element, or shuffled
    pairs with ``data.pairs_as_examples``; validation always grouped."""
    mesh, rules, d = opened.mesh, opened.rules, config.data
    data_dir = opened.paths.world
    fmt = pipeline.TextFormat(opened.tokenizer, d.max_len, d.max_prompt_len, d.prompt_template)
    sharding.check_batch_size("config.batch_size", config.batch_size, mesh, rules)
    sharding.check_batch_size("config.eval_batch_size", config.eval_batch_size, mesh, rules)
    files = {"train": data_dir / d.train_file, "valid": data_dir / d.valid_file}
    src = tfds_builder.build("comparisons", files, opened.paths.cache, d.skip_bad)
    if d.train_records:  # a smaller comparison set, as in Gao et al.'s data-size sweep
        if d.train_records > len(src["train"]):
            raise ValueError(
                f"config.data.train_records={d.train_records} but {files['train']} has {len(src['train'])} rankings"
            )
        src["train"] = grain.MapDataset.source(src["train"])[: d.train_records]
    block = sharding.batch_block(mesh, rules)  # this process's rows of every batch
    packed_batches = 0
    if d.get("pack_rows", 0):
        rows, groups = d.pack_rows, packed_groups(d.pack_rows, sharding.batch_divisor(mesh, rules))
        sharding.check_batch_size("config.data.pack_rows", rows, mesh, rules)
        plan = pipeline.packed_plan(src["train"], rows, config.seed, groups=groups, k_max=d.k_max)
        train_iter = pipeline.packed_comparison_batches(src["train"], fmt, plan, shard=block)
        packed_batches = plan.epoch_batches(0)
    else:
        train_iter = pipeline.comparison_batches(
            src["train"],
            fmt,
            config.batch_size,
            config.seed,
            k_max=d.k_max,
            pairs_as_examples=d.pairs_as_examples,
            shard=block,
        )
    eval_batches = list(
        pipeline.comparison_batches(
            src["valid"], fmt, config.eval_batch_size, 0, k_max=d.k_max, shuffle=False, num_epochs=1, shard=block
        )
    )
    if opened.paths.synthetic:  # the synthetic world: its gold score orders the validation pairs
        _add_gold_pair_masks(eval_batches, src["valid"], d.k_max, block)
    if d.pairs_as_examples:
        train_size = sum(len(formats.ranking_pairs(_ranking(src["train"][i]))) for i in range(len(src["train"])))
    else:
        train_size = len(src["train"])
    return Data({"train": iter(train_iter)}, eval_batches, train_size, fmt, packed_batches)


def packed_groups(rows: int, batch_divisor: int) -> int:
    """The prompt slots of a packed batch of ``rows`` completion rows: room for the most prompts that fit (K ≥ 2:
    ``rows // 2``), rounded up to a multiple of the batch shards, since the slots are split over them too."""
    return -(-(rows // formats.MIN_K) // batch_divisor) * batch_divisor


def validation_metrics(eval_step: Any, params: Any, eval_batches: list[dict], mesh: Any, rules: Any) -> dict:
    """``val_loss`` (per prompt), ``val_accuracy`` (per pair), the rewards' mean and std over completions, and
    ``val_gold_accuracy`` when the batches carry gold pair masks: exact means over uneven batches."""
    sums: dict[str, float] = {}
    for batch in eval_batches:
        out = eval_step(params, sharding.to_global(batch, mesh, rules))
        out["loss_sum"], out["correct"] = out["loss"] * out["prompts"], out["accuracy"] * out["pairs"]
        for key in ("loss_sum", "correct", "prompts", "pairs", "completions", "reward_sum", "reward_sq_sum"):
            sums[key] = sums.get(key, 0.0) + float(out[key])
        for key in ("gold_pairs", "gold_correct"):
            if key in out:
                sums[key] = sums.get(key, 0.0) + float(out[key])
    mean = sums["reward_sum"] / max(sums["completions"], 1.0)
    result = {
        "val_loss": sums["loss_sum"] / max(sums["prompts"], 1.0),
        "val_accuracy": sums["correct"] / max(sums["pairs"], 1.0),
        "val_reward_mean": mean,
        "val_reward_std": math.sqrt(max(sums["reward_sq_sum"] / max(sums["completions"], 1.0) - mean**2, 0.0)),
    }
    if "gold_pairs" in sums:
        result["val_gold_accuracy"] = sums["gold_correct"] / max(sums["gold_pairs"], 1.0)
    return result


def make_loss_fn(model: Transformer) -> steps.LossFn:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` of ``steps.make_train_step`` for comparison batches,
    padded (``pipeline.comparison_batches``: ``tokens [B,K,T]``) or packed (``packed_comparison_batches``:
    ``tokens [R,T]`` and ``slots [B,K]``): the ranking loss of the rewards at each completion's last token, the
    pair accuracy, and sums for exact validation means (``gold_*`` when the batch has a ``gold_pair_mask``).

    Packed, the R rows' rewards are gathered into the padded layout, ``r[b, k] = rewards[slots[b, k]]``, and
    everything after that is the padded computation: the same loss and gradient for the same prompts."""

    def loss_fn(params, batch, rng):
        rngs = None if rng is None else {"dropout": rng}
        if "slots" in batch:  # packed: one forward row per real completion (and the few padding rows)
            rows = batch["tokens"].shape[0]
            tokens, mask = batch["tokens"], batch["mask"]
            rewards_bk = scoring.sequence_rewards(model, params, tokens, mask, rngs, right_padded=True)[batch["slots"]]
        else:
            b, k, t = batch["tokens"].shape
            rows = b * k
            rewards_bk = scoring.sequence_rewards(
                model,
                params,
                batch["tokens"].reshape(b * k, t),
                batch["mask"].reshape(b * k, t),
                rngs,
                right_padded=True,  # comparison batches are right-padded (pipeline.encode_comparison)
            ).reshape(b, k)
        pair_mask = batch["pair_mask"] * batch["row_valid"][:, None, None]
        loss, accuracy = losses.ranking_loss(rewards_bk, pair_mask)
        valid = (batch["valid"] * batch["row_valid"][:, None]).astype(jnp.float32)
        n_pairs, n_prompts = pair_mask.sum(), (pair_mask.sum(axis=(1, 2)) > 0).sum()
        out = {
            "accuracy": accuracy,
            "reward_mean": (rewards_bk * valid).sum() / jnp.maximum(valid.sum(), 1.0),
            # sums for exact validation means over uneven batches
            "prompts": n_prompts,
            "pairs": n_pairs,
            "completions": valid.sum(),
            "reward_sum": (rewards_bk * valid).sum(),
            "reward_sq_sum": (jnp.square(rewards_bk) * valid).sum(),
            "real_tokens": batch["mask"].sum(),
            "computed_tokens": batch["tokens"].size,
            "computed_completions": rows,  # with ``completions``: the share of the forward pass spent on padding
        }
        if "gold_pair_mask" in batch:
            gold = batch["gold_pair_mask"] * batch["row_valid"][:, None, None]
            out["gold_pairs"] = gold.sum()
            out["gold_correct"] = losses.ranking_loss(rewards_bk, gold)[1] * gold.sum()
        return loss, out

    return loss_fn


def _ranking(record: dict) -> list:
    return tfds_builder.decode(record, "comparisons")["ranking"]


def _from_policy(policy_workdir: str, rm_params: Any, cfg: ModelConfig, mesh, rules) -> Any:
    """The RM's params with everything but the scalar head taken from a policy (LM-head) checkpoint."""
    policy = Transformer(dataclasses.replace(cfg, head="lm"))
    loaded = checkpoint.load_params(policy_workdir, *sharding.model_shardings(policy, mesh, rules))
    missing = set(rm_params) - set(loaded) - {"score_head"}
    if missing:
        raise ValueError(f"policy checkpoint {policy_workdir} lacks {sorted(missing)}")
    return {name: rm_params[name] if name == "score_head" else loaded[name] for name in rm_params}


def _add_gold_pair_masks(batches: list[dict], source: Any, k_max: int, block: tuple[int, int]) -> None:
    """Attach ``gold_pair_mask [B,K,K]`` (i's gold score above j's) to the validation batches, in place.

    The batches come from ``comparison_batches(shuffle=False, num_epochs=1)``: row r of this process's
    batch n is record ``(n · blocks + block) · rows + r`` (``block``: ``sharding.batch_block``), padding
    rows after the end.
    """
    for n, batch in enumerate(batches):
        rows = batch["tokens"].shape[0]
        gold = np.zeros((rows, k_max, k_max), np.int32)
        for r in range(rows):
            record = (n * block[1] + block[0]) * rows + r
            if record >= len(source) or not batch["row_valid"][r]:
                continue
            row = tfds_builder.decode(source[record], "comparisons")
            scores = [world_tasks.gold_score(row["prompt"], c, True) for c in row["completions"]]
            for i, si in enumerate(scores):
                for j, sj in enumerate(scores):
                    gold[r, i, j] = si > sj
        batch["gold_pair_mask"] = gold


def _mean_demo_reward(model, params, source, fmt, batch_size, mesh, rules) -> float:
    """Mean raw reward of the demonstrations (prompt ⊕ completion ⊕ EOS, as the RM is trained)."""
    total = count = 0.0

    @jax.jit
    def rewards(params, batch):
        r = scoring.sequence_rewards(model, params, batch["tokens"], batch["mask"], right_padded=True)
        return (r * batch["row_valid"]).sum(), batch["row_valid"].sum()

    block = sharding.batch_block(mesh, rules)
    with sharding.use(mesh, rules):
        for batch in pipeline.sft_batches(source, fmt, batch_size, 0, shuffle=False, num_epochs=1, shard=block):
            s, n = rewards(params, sharding.to_global(batch, mesh, rules))
            total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
