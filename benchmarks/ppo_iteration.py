"""One PPO-ptx iteration at a real shape, split into its phases, on the backend JAX finds. One JSON line:

    python benchmarks/ppo_iteration.py                                  # GPT-2 124M, 32 x (256 + 256), mb 8
    python benchmarks/ppo_iteration.py --model=gpt2_355m --batch=64     # another shape
    python benchmarks/ppo_iteration.py --sweep --out=/tmp/sweep.json    # how each phase grows (plots: --plot_dir)
    python benchmarks/ppo_iteration.py --plot_from=/tmp/sweep.json --plot_dir=docs/images

The iteration is ``train_ppo.make_iteration``'s, built from the same functions (``sampling.generate``,
``ppo_steps.make_score``, ``ppo_steps.make_update``) on random weights: four parameter sets (policy,
reference, value model, RM; vocabulary 50,257), ``--batch`` prompts of ``--prompt_len`` tokens, responses of
``--response_len`` tokens (EOS disabled, so every row decodes the full length), one epoch of minibatches of
``--minibatch`` with ``--ptx_ratio`` pretraining rows per episode (rows of prompt + response tokens).

Phases, each the best of ``--repeats`` after one untimed iteration that compiles every program:

- **generate**: prefill and decode (``sampling.generate``);
- **score**: the four forward passes, KL-shaped rewards and GAE (``make_score``);
- **update**: the minibatch updates of the policy and value model without the pretraining term;
- **ptx**: what the pretraining term adds to them (the updates with it, minus ``update``).

Also: tokens/s (episodes × (prompt + response) / iteration), the generation share, the programs compiled in
the untimed iteration and after it (``compiles_after_first`` must be 0), peak memory (host RSS on CPU,
``memory_stats`` on an accelerator), each phase's model FLOPs and FLOP/s against the measured matmul rate,
and the decode step against memory bandwidth: seconds per step ((generate − generate of one token) /
(response − 1)), the parameter + KV-cache bytes a step reads (``sampling.kv_slots_per_step``), and the
fraction of the measured read bandwidth (a jitted sum over 256 MiB) that this is.

``--sweep`` runs each point in its own process (so its peak RSS is its own): response length 64 → 512,
batch 8 → 64 and model 19M → 124M → 355M (``--axes`` picks some), each varied from the base the other flags
give. ``--out`` keeps the points: a sweep with the same ``--out`` adds to it, and ``--plot_from`` takes
several files (comma-separated).
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from instructjax import configlib, ppo_setup, ppo_steps, sampling, sharding
from instructjax.model import ModelConfig, count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = {"response_len": [64, 128, 256, 512], "batch": [8, 16, 32, 64], "model": ["gpt2_19m", "gpt2_124m", "gpt2_355m"]}
PHASES = ("generate", "score", "update", "ptx")


def model_cfg(name: str, dtype: str = "float32", remat: str = "full") -> ModelConfig:
    """A ``configs/model.py`` preset, or ``gpt2_19m``: the GPT-2-shaped 19M model of the other benchmarks
    (d_model 256, 8 layers: benchmarks/sampling.py's default), rematerialised by ``remat``. A rematerialised
    model scans its layers: XLA schedules unscanned blocks' recomputation early, so ``remat`` alone leaves the
    memory plan as it was (the update at the default shape plans 56 GB either way; docs/benchmarks.md)."""
    if name == "gpt2_19m":
        cfg = dict(vocab_size=50257, d_model=256, n_layers=8, n_heads=4, d_ff=1024, max_len=1024)
    else:
        cfg = configlib.load_config(f"{REPO}/configs/model.py:{name}").model.to_dict()
    return ModelConfig.from_dict(
        {**cfg, "dropout_rate": 0.0, "dtype": dtype, "scan_layers": remat != "none", "remat": remat}
    )


class CompileCounter:
    """Counts XLA backend compilations (JAX's ``/jax/core/compile/backend_compile_duration`` event)."""

    def __init__(self) -> None:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, seconds: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def read_bandwidth(repeats: int) -> float:
    """Bytes/s of a jitted sum over 256 MiB of float32: reading, as a decode step reads weights and cache."""
    big = jnp.ones((64 * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    return big.nbytes / min(_timed(lambda: total(big).block_until_ready()) for _ in range(repeats))


def matmul_rate(repeats: int) -> float:
    """FLOP/s of a jitted 1024² float32 matmul (benchmarks/timing.py's peak)."""
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * 1024**3 / min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))


def phase_flops(cfg: ModelConfig, n_params: int, episodes: int, prompt: int, new: int, ptx_rows: int) -> dict:
    """Model FLOPs of each phase: 2·N per token forward and 6·N forward and backward, where N counts the weights
    a token is multiplied by (no embedding lookups), plus attention: 2·2·layers·d_model per query-key pair
    forward. The LM head (vocab × d_model) counts where its logits are used: every position in generation's
    prefill and steps and in the ptx rows, the response positions only when the policy and the reference score
    a response (``scoring.response_logprobs``); the value model's and RM's scalar heads are not counted.
    Generation is the prefill and one cached step per response token; scoring is four forward passes over
    prompt + response; the update is the policy and value model forward and backward; ptx is the policy on its
    rows. Recomputation is not counted: neither remat's nor the update's second head matmul per block
    (``scoring.token_logprobs`` recomputes its logits in the backward pass rather than keep them)."""
    table = cfg.vocab_size * cfg.d_model
    positions = cfg.max_len * cfg.d_model * (cfg.positions == "learned")
    body = n_params - table * (1 if cfg.tie_embeddings else 2) - positions
    length = prompt + new
    attn = lambda rows, q, k: 4 * cfg.n_layers * cfg.d_model * rows * q * k  # q queries over k keys each
    forward = lambda n: 2 * n * episodes * length + attn(episodes, length, (length + 1) / 2)
    response_head = 2 * table * episodes * new
    generate = 2 * (body + table) * episodes * length + attn(episodes, prompt, (prompt + 1) / 2)
    generate += attn(episodes, new, prompt + (new + 1) / 2)
    return {
        "generate": generate,
        "score": 2 * (forward(body) + response_head) + 2 * forward(body),
        "update": 3 * (forward(body) + response_head) + 3 * forward(body),
        "ptx": 3 * forward(body + table) * ptx_rows / episodes,
    }


def measure(
    cfg: ModelConfig,
    episodes: int,
    prompt: int,
    new: int,
    minibatch: int,
    ptx_ratio: int,
    repeats: int,
    counter: CompileCounter | None = None,
) -> dict:
    """One PPO-ptx iteration of random-weight models, as ``train_ppo.make_iteration`` runs it: seconds per phase
    (the best of ``repeats`` after a compiling iteration) and the figures of the module docstring."""
    counter = counter or CompileCounter()
    config = configlib.load_config(f"{REPO}/configs/ppo.py:tiny_ptx")
    config.update_from_flattened_dict(
        {
            "batch_size": episodes,
            "minibatch_size": minibatch,
            "max_new_tokens": new,
            "data.max_prompt_len": prompt,
            "data.ptx_len": prompt + new,
            "ptx_ratio": ptx_ratio,
            "ptx_coef": 1.0 if ptx_ratio else 0.0,
            "num_iterations": 1,
        }
    )
    value_cfg = dataclasses.replace(cfg, head="scalar")
    mesh, rules = sharding.make_mesh(config.mesh_shape), sharding.as_rules(config.rules)
    plan = ppo_setup.plan(config, cfg, value_cfg, mesh, rules)
    example = np.zeros((1, 4), np.int32)
    with sharding.use(mesh, rules):
        policy, _ = sharding.init_params(plan.models["policy"], jax.random.key(0), example, mesh, rules)
        value, _ = sharding.init_params(plan.models["value"], jax.random.key(1), example, mesh, rules)
        frozen = {"ref": jax.tree.map(jnp.copy, policy), "rm": jax.tree.map(jnp.copy, value)}
        state = jax.jit(lambda p, v: plan.new_state(p, v, plan.rng_data), out_shardings=plan.state_sh)(policy, value)
        score = ppo_steps.make_score(plan.models, config, eos_id=-1, rm_bias=0.0)
        update = ppo_steps.make_update(
            plan.models, cfg, config, plan.tx_policy, plan.tx_value, mesh, rules, plan.state_sh
        )
        rs = np.random.RandomState(0)
        batch = sharding.to_global(
            {
                "prompt": rs.randint(3, cfg.vocab_size, (episodes, prompt)).astype(np.int32),
                "prompt_mask": np.ones((episodes, prompt), np.int32),
            },
            mesh,
            rules,
        )
        ptx = None
        if plan.ptx_rows:
            ptx_tokens = rs.randint(3, cfg.vocab_size, (plan.ptx_rows, prompt + new)).astype(np.int32)
            ones = np.ones_like(ptx_tokens)
            ptx = {"tokens": ptx_tokens, "segment_ids": ones, "mask": ones, "loss_mask": ones}
            ptx = sharding.to_global(ptx, mesh, rules)
        held: dict = {"state": state}

        def generate(tokens: int = new) -> Callable[[], None]:
            def run():
                held["gen"] = sampling.generate(
                    held["state"].params,
                    cfg,
                    batch["prompt"],
                    batch["prompt_mask"],
                    jax.random.key(0),
                    max_new_tokens=tokens,
                    eos_id=-1,
                )
                jax.block_until_ready(held["gen"])

            return run

        def scoring():
            s = held["state"]
            held["ro"] = score(s.params, s.value_params, frozen, batch, held["gen"], s.kl_coef, None)
            jax.block_until_ready(held["ro"])

        def updates(with_ptx: bool) -> Callable[[], None]:
            def run():
                s = held["state"]
                for i in range(episodes // minibatch):
                    rows = jnp.arange(i * minibatch, (i + 1) * minibatch)
                    s, _ = update(s, held["ro"], rows, ptx if with_ptx else None)
                held["state"] = jax.block_until_ready(s)

            return run

        iteration = {"generate": generate(), "score": scoring, "update_ptx": updates(True)}
        extra = {"update": updates(False)} if ptx is not None else {}
        extra["generate_one"] = generate(1)
        before = counter.count
        for fn in (*iteration.values(), *extra.values()):  # untimed: compiles every program
            fn()
        compiled_first = counter.count - before
        runs = {**iteration, **extra}
        seconds = {name: min(_timed(fn) for _ in range(repeats)) for name, fn in runs.items()}
        compiles_after_first = counter.count - before - compiled_first  # in the timed runs: must be 0
    n_params = count_params(policy)
    with_ptx = seconds.pop("update_ptx")
    update_s = seconds.pop("update", with_ptx)
    phases = {"generate": seconds["generate"], "score": seconds["score"], "update": update_s}
    phases["ptx"] = with_ptx - update_s
    total = sum(phases.values())
    flops = phase_flops(cfg, n_params, episodes, prompt, new, plan.ptx_rows * (episodes // minibatch))
    step_s = (phases["generate"] - seconds["generate_one"]) / max(new - 1, 1)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    param_bytes = n_params * itemsize
    kv_slots = sampling.kv_slots_per_step(prompt, new)
    kv_bytes = 2 * cfg.n_layers * episodes * cfg.num_kv_heads * cfg.dim_per_head * itemsize * kv_slots
    device_memory = jax.devices()[0].memory_stats() or {}  # None on CPU: the host's peak RSS instead
    return {
        "device": jax.devices()[0].device_kind,
        "model_dtype": cfg.dtype,
        "params": n_params,
        "batch": episodes,
        "prompt_len": prompt,
        "response_len": new,
        "minibatch": minibatch,
        "ptx_rows_per_minibatch": plan.ptx_rows,
        "seconds": phases,
        "iteration_s": total,
        "generation_share": phases["generate"] / total,
        "tokens_per_s": episodes * (prompt + new) / total,
        "flops": flops,
        "flops_per_s": {k: flops[k] / phases[k] if phases[k] > 0 else None for k in PHASES},
        "decode": {
            "step_s": step_s,
            "bytes_per_step": param_bytes + kv_bytes,
            "param_bytes": param_bytes,
            "kv_bytes": kv_bytes,
            "bytes_per_s": (param_bytes + kv_bytes) / step_s,
        },
        "compiled_first_iteration": compiled_first,
        "compiles_after_first": compiles_after_first,
        "peak_device_bytes": device_memory.get("peak_bytes_in_use"),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def point_args(args: argparse.Namespace) -> list[str]:
    keys = ("model", "dtype", "remat", "prompt_len", "response_len", "batch", "minibatch", "ptx_ratio", "repeats")
    return [f"--{k}={getattr(args, k)}" for k in keys]


def sweep(args: argparse.Namespace) -> list[dict]:
    """Each axis of ``SWEEP`` varied from the base shape, one process per point (the base point runs once)."""
    results, done = [], {}
    if args.out and os.path.exists(args.out):  # an earlier sweep into the same file: keep its points
        with open(args.out) as f:
            results = json.load(f)
    for axis in args.axes.split(","):
        values = SWEEP[axis]
        for value in values:
            point = argparse.Namespace(**{**vars(args), axis: value})
            key = tuple(point_args(point))
            if key not in done:
                command = [sys.executable, os.path.abspath(__file__), *key]
                print("[sweep]", " ".join(command[2:]), file=sys.stderr, flush=True)
                out = subprocess.run(command, capture_output=True, text=True)
                if out.returncode:  # e.g. out of memory: recorded with its last line, the sweep goes on
                    done[key] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
                    print("[sweep] failed:", done[key]["error"], file=sys.stderr, flush=True)
                else:
                    done[key] = json.loads(out.stdout.strip().splitlines()[-1])
            results.append({"axis": axis, "value": value, **done[key]})
            if args.out:  # written after every point: a long sweep cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    return results


def plot(results: list[dict], plot_dir: str) -> list[str]:
    """One figure per swept axis: each phase's seconds against the axis, and the same phase's seconds if it
    grew only with its FLOPs from the axis's first point (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    for axis in SWEEP:
        points = [r for r in results if r["axis"] == axis and "error" not in r]
        if len(points) < 2:
            continue
        xs = [p["params"] / 1e6 if axis == "model" else p["value"] for p in points]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for phase, color in zip(PHASES, ("C0", "C1", "C2", "C3"), strict=True):
            ys = [p["seconds"][phase] for p in points]
            if max(ys) <= 0:
                continue
            ax.plot(xs, ys, "o-", color=color, label=phase)
            ideal = [ys[0] * p["flops"][phase] / points[0]["flops"][phase] for p in points]
            ax.plot(xs, ideal, "--", color=color, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel({"model": "policy parameters (M)", "batch": "episodes", "response_len": "response tokens"}[axis])
        ax.set_ylabel("seconds per iteration")
        base = points[0]
        ax.set_title(f"PPO-ptx phases vs {axis} (dashed: FLOPs-proportional)", fontsize=9)
        ax.legend(fontsize=8)
        fig.text(0.01, 0.01, f"{base['device']}; others at the base shape", fontsize=6)
        fig.tight_layout()
        path = os.path.join(plot_dir, f"ppo_sweep_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2_124m", help="a configs/model.py preset, or gpt2_19m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--response_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="episodes per iteration")
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--ptx_ratio", type=int, default=8, help="pretraining rows per episode (0: plain PPO)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--remat", default="full", choices=["none", "full", "dots"], help="the models' rematerialisation (backward)"
    )
    parser.add_argument("--sweep", action="store_true", help="vary response length, batch and model from the base")
    parser.add_argument("--axes", default=",".join(SWEEP), help="the axes --sweep varies, comma-separated")
    parser.add_argument("--out", default="", help="the sweep's results (JSON), written after every point")
    parser.add_argument("--plot_dir", default="", help="write the sweep's plots here")
    parser.add_argument("--plot_from", default="", help="plot an earlier sweep's --out file instead of running")
    args = parser.parse_args()
    if args.plot_from or args.sweep:
        if args.plot_from:
            results = []
            for path in args.plot_from.split(","):
                with open(path) as f:
                    results += json.load(f)
        else:
            results = sweep(args)
        if args.plot_dir:
            print("\n".join(plot(results, args.plot_dir)), file=sys.stderr)
        for r in results:
            if "error" in r:
                print(f"{r['axis']}={r['value']}: {r['error']}", file=sys.stderr)
                continue
            split = ", ".join(f"{k} {v:.3g}" for k, v in r["seconds"].items())
            print(f"{r['axis']}={r['value']}: {split} s; generation {r['generation_share']:.0%}", file=sys.stderr)
        print(json.dumps(results))
        return
    counter = CompileCounter()
    result = measure(
        model_cfg(args.model, args.dtype, args.remat),
        args.batch,
        args.prompt_len,
        args.response_len,
        args.minibatch,
        args.ptx_ratio,
        args.repeats,
        counter,
    )
    result["model"], result["remat"] = args.model, args.remat
    result["matmul_flops_per_s"] = matmul_rate(3)
    result["read_bytes_per_s"] = read_bandwidth(3)
    result["decode"]["fraction_of_read_bandwidth"] = result["decode"]["bytes_per_s"] / result["read_bytes_per_s"]
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
