"""Dense vs SkipGPT `mask` vs `capacity` routing: forward and router-training-step time against the FLOP ideal.

The model is a LlamaForCausalLM with random weights, of the shape of SmolLM2-135M (--shape smollm2, the default:
30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab 49152, tied embeddings) or of a 4-layer slice of
Llama-2-7B (--shape llama2-7b-4l: hidden 4096, 32 heads / 32 KV heads, MLP 11008, vocab 32000), fp32 on CPU by
default (--device cuda, --dtype bfloat16 for the GPU). Every variant is measured in the same run, round-robin
inside each repeat (so background load hits all of them alike), forwards and train steps in separate phases;
medians are reported. On CPU glibc is told to keep freed memory (--allocator keep, the default), so no timed call
pays page faults that depend on the heap's state; the faults column shows the median per forward. On CUDA every
timed region is bracketed by torch.cuda.synchronize(), each variant gets --warmup untimed calls first, a measurement
is the mean of --iters back-to-back calls, --allocator is ignored, and the memory column is the peak
torch.cuda.max_memory_allocated above the resident memory (weights) during the timed calls. Routed variants always
run routers.inference_slots=static (k = ceil(c * S) slots, no host read of the decisions: the GPU's sync-free path).

    python bench/routed_forward.py                       # full run: S=1024, B=1, 30 layers, 5 repeats
    python bench/routed_forward.py --quick               # smoke run: 4 layers, S=256, 2 repeats (<30 s)
    python bench/routed_forward.py --kv-policy both      # kv_policy all and routed side by side
    python bench/routed_forward.py --quick --compile     # + torch.compile'd dense and capacity variants
                                                          # (each decoder block, inductor; ratios vs compiled dense)
    python bench/routed_forward.py --device cuda --dtype bfloat16 --shape llama2-7b-4l   # GPU, 7B slice
    python bench/routed_forward.py --device cuda --compile --compile-mode reduce-overhead  # + CUDA graphs

Routers are set so the skip fraction is known exactly:
- capacity variants: every router says "execute" with a margin of ~20 logits (bias [+10, -10] plus a small
  per-token term so that WHICH tokens win a slot varies along the sequence, as with trained routers). Gumbel
  noise (train mode) never flips a margin that large, so every capacity slot is full and exactly
  k = ceil(c * S) tokens run each sublayer; the rest overflow (= skip). routing_stats shows it.
- mask variant: routers calibrated so ~25% of tokens skip; mask mode runs every sublayer on every token
  anyway, so its time must be >= dense.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (SHAPES, Shape, add_allocator_option, add_device_options, build_random_model,  # noqa: E402
                          cuda_peak_mib, cuda_peak_start, device_allocator, device_record, flop_parts, flop_shares,
                          ideal_ratio, loadavg, median, minor_faults, resolve_device_options, round_robin,
                          router_linear_input, shape_config, shape_of, time_call)
from skipgpt_dist import RouterConfig, attach_routers, routing_context, routing_stats  # noqa: E402
from skipgpt_dist.routing import routed_layers  # noqa: E402
from skipgpt_dist.routing.capacity_plan import warm_start_capacity  # noqa: E402
from skipgpt_dist.training.compile import compile_layer, uncompile_layer  # noqa: E402

SKIPS = (0.25, 0.40)  # capacity = 1 - skip
TARGET_FWD, TARGET_TRAIN = 0.05, 0.07  # allowed gap to the ideal ratio (from the issue)


# ----------------------------------------------------------------------------------------------------------------
# Models and router settings
# ----------------------------------------------------------------------------------------------------------------
def build_models(layers: int, seq_len: int, shape: str = "smollm2", dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> tuple[LlamaForCausalLM, LlamaForCausalLM, Shape]:
    """Dense and routed (routers attached, fp32) copies of a random-weight model of SHAPES[shape] with `layers`
    layers, on `device` in `dtype`."""
    config = shape_config(shape, layers=layers, max_positions=seq_len, attn_implementation="sdpa")
    dense = build_random_model(config, dtype, device)
    routed = copy.deepcopy(dense)
    attach_routers(routed, RouterConfig(mode="mask", capacity=1.0, kv_policy="all"))
    for model in (dense, routed):
        for name, param in model.named_parameters():
            param.requires_grad_("skipgpt_" in name)  # base frozen, routers trainable
    return dense, routed, shape_of(config)


def _routers(model):
    return [m for n, m in model.named_modules() if n.endswith(("skipgpt_attn_router", "skipgpt_mlp_router"))]


@torch.no_grad()
def router_settings(model, ids: torch.Tensor, mask_capacity: float) -> dict[str, list[dict]]:
    """Two router states: `capacity` (every token executes, margin ~20 +- 1) and `mask` (~mask_capacity execute).

    The inputs of each router's final Linear (what it really reads, e.g. after the router's own input
    normalisation) are captured in one all-execute forward; each router gets a random direction w scaled so the
    per-token margin h.w has std 1 (so the token ranking for capacity slots varies along the sequence).
    """
    ctx = routing_context(model)
    saved_cfg = ctx.cfg
    ctx.cfg = RouterConfig(mode="mask", capacity=1.0, kv_policy="all")
    routers, inputs = _routers(model), {}
    for r in routers:
        r.net.weight.zero_()
        r.net.bias.copy_(torch.tensor([10.0, -10.0]))
    hooks = [r.net.register_forward_hook(lambda mod, args, out, r=r: inputs.__setitem__(r, router_linear_input(args)))
             for r in routers]
    model.eval()
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(1234)
    states = {"capacity": [], "mask": []}
    for r in routers:
        h = inputs[r].reshape(-1, inputs[r].shape[-1]).float()
        w = torch.randn(h.shape[-1], generator=gen).to(h.device)  # (the CPU generator: same directions anywhere)
        margin = h @ w
        w = w / margin.std().clamp_min(1e-6)
        margin = h @ w
        weight = torch.stack([w / 2, -w / 2])
        b = -float(torch.quantile(margin, 1.0 - mask_capacity))  # fraction mask_capacity has margin + b > 0
        bias = r.net.bias
        states["capacity"].append({"net.weight": weight.clone(), "net.bias": torch.tensor([10.0, -10.0]).to(bias)})
        states["mask"].append({"net.weight": weight.clone(), "net.bias": torch.tensor([b / 2, -b / 2]).to(bias)})
    ctx.cfg = saved_cfg
    return states


@torch.no_grad()
def load_router_state(model, state: list[dict]) -> None:
    for r, s in zip(_routers(model), state):
        r.net.weight.copy_(s["net.weight"])
        r.net.bias.copy_(s["net.bias"])


# ----------------------------------------------------------------------------------------------------------------
# Variants and measurement
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # dense | mask | capacity
    capacity: float = 1.0
    kv_policy: str = "all"
    compiled: bool = False  # torch.compile'd decoder blocks; its ratios are against compiled dense
    plan: Optional[tuple] = None  # a training recipe's per-layer capacities ((attn...), (mlp...)), else None

    def router_config(self) -> RouterConfig:
        layer_capacity = None if self.plan is None else {"attn": list(self.plan[0]), "mlp": list(self.plan[1])}
        return RouterConfig(mode=self.mode, capacity=self.capacity, kv_policy=self.kv_policy,
                            inference_slots="static", layer_capacity=layer_capacity)

    def mean_capacity(self) -> tuple[float, float]:
        """(attention, MLP) slot fractions averaged over layers (every layer has the same FLOPs)."""
        return self.router_config().mean_capacity(len(self.plan[0])) if self.plan else (self.capacity,) * 2

    @property
    def baseline(self) -> str:
        return "dense+compile" if self.compiled else "dense"


def recipe_plan(config_path: str, layers: int) -> Optional[tuple]:
    """The per-layer capacities a training config runs with on a model of `layers` layers, as
    capacity_plan=warm_start makes them (which layers the ranking marks does not change the FLOPs: every layer
    costs the same, so the first ones stand in), or the config's per-kind / explicit plan. None for mode=mask."""
    from skipgpt_dist.config import load_config

    cfg = load_config(config_path).routers
    if cfg.mode != "capacity":
        return None
    if cfg.capacity_plan == "warm_start":
        attn_frac, mlp_frac = cfg.warm_start_fractions()
        # (one global target ranks both kinds together; without a model to rank, each kind takes that fraction)
        mlp_frac = attn_frac if mlp_frac is None else mlp_frac
        plan = warm_start_capacity(layers, list(range(round(attn_frac * layers))),
                                   list(range(round(mlp_frac * layers))), cfg.marked_capacities())
    else:
        plan = {kind: [cfg.capacity_for(k, i) for i in range(layers)] for k, kind in enumerate(("attn", "mlp"))}
    return tuple(plan["attn"]), tuple(plan["mlp"])


def variants(kv_policies: list[str], compiled: bool = False, recipe: Optional[tuple] = None) -> list[Variant]:
    out = [Variant("dense", "dense")]
    for kv in kv_policies:
        out.append(Variant(f"mask/{kv}", "mask", 1.0, kv))
        for skip in SKIPS:
            cap = round(1.0 - skip, 4)
            out.append(Variant(f"capacity{cap:.2f}/{kv}", "capacity", cap, kv))
        if recipe is not None:  # the training recipe's own per-layer, per-kind slots
            out.append(Variant(f"recipe/{kv}", "capacity", 1.0, kv, plan=recipe))
    if compiled:  # dense compiled vs routed compiled (capacity slots: the static-shape path that compiles whole)
        out += [Variant("dense+compile", "dense", compiled=True)] + [
            Variant(v.name + "+compile", v.mode, v.capacity, v.kv_policy, compiled=True, plan=v.plan)
            for v in out if v.mode == "capacity"]
    return out


class Bench:
    def __init__(self, dense, routed, states, ids: torch.Tensor, compiled: bool = False, device: str = "cpu",
                 iters: int = 1, compile_mode: str | None = None):
        self.dense, self.routed, self.states, self.ids = dense, routed, states, ids
        self.device, self.iters = device, iters
        self.cuda = torch.device(device).type == "cuda"
        self.compile_kwargs = {"mode": compile_mode} if compile_mode else {}
        self.stats: dict[str, dict] = {}
        self.dense_compiled = None
        if compiled:  # each decoder block compiled, as torchtitan does (and training/compile.py for routed blocks)
            # one routed graph per (capacity, kv_policy, train/eval, layer 0 or not): more than the default 8
            torch._dynamo.config.cache_size_limit = 64
            self.dense_compiled = copy.deepcopy(dense)
            for layer in self.dense_compiled.model.layers:
                layer.compile(**self.compile_kwargs)

    def select(self, v: Variant):
        if v.mode == "dense":
            return self.dense_compiled if v.compiled else self.dense
        for layer in routed_layers(self.routed):  # (dynamo's cache lives on the code: re-wrapping recompiles nothing)
            if v.compiled:
                compile_layer(layer, **self.compile_kwargs)
            else:
                uncompile_layer(layer)
        ctx = routing_context(self.routed)
        # static slots at inference too: this bench measures the k = ceil(c * S) slot path that training runs
        # (dynamic inference slots would run every token here, since every router says execute)
        ctx.cfg = v.router_config()
        load_router_state(self.routed, self.states["mask" if v.mode == "mask" else "capacity"])
        return self.routed

    def forward(self, v: Variant, model=None) -> None:
        """One eval forward of v (model: v's selected model, when the caller already selected it)."""
        model = self.select(v) if model is None else model
        model.eval()
        with torch.inference_mode():
            # compiled variants run without a KV cache: cache appends are host state that compiled routed blocks
            # leave to eager code (and a cache makes dense's compiled layers recompile per layer)
            model(input_ids=self.ids, use_cache=not v.compiled)

    def train_step(self, v: Variant, model=None) -> None:
        """Router-training step: train mode (Gumbel gates), LM cross-entropy, backward into the routers only.

        Dense has no trainable parameters, so its step is forward + backward of the same loss with the input
        embeddings' output requiring grad: forward + activation-gradient backward through the frozen model,
        which is exactly the work router training needs besides the (negligible) router weight gradients, i.e.
        the fair baseline for router training. (One small asymmetry, in the routed variants' favour: their
        backward stops at layer 0's routers, whose input needs no gradient, so layer 0's sublayers are not
        back-propagated through; dense back-propagates into the embeddings. About 1/30 of the backward.)
        """
        model = self.select(v) if model is None else model
        model.train()
        model.zero_grad(set_to_none=True)
        if v.mode == "dense":
            embeds = model.get_input_embeddings()(self.ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=self.ids, use_cache=not v.compiled).loss
        else:
            loss = model(input_ids=self.ids, labels=self.ids, use_cache=not v.compiled).loss
        loss.backward()
        model.eval()

    def _timed(self, fn) -> float:
        """Seconds per call: the mean of self.iters back-to-back calls (synchronised on cuda)."""
        return time_call(lambda: [fn() for _ in range(self.iters)], self.device) / self.iters

    def measure_forward(self, v: Variant) -> dict[str, float]:
        model = self.select(v)  # (router states and compiled/eager switch: outside the timed region)
        if self.cuda:
            start = cuda_peak_start(self.device)
            forward = self._timed(lambda: self.forward(v, model))
            return {"forward": forward, "forward_peak_mib": cuda_peak_mib(self.device, start)}
        faults = minor_faults()
        forward = self._timed(lambda: self.forward(v, model))
        return {"forward": forward, "forward_faults": minor_faults() - faults}

    def measure_train(self, v: Variant) -> dict[str, float]:
        model = self.select(v)
        if self.cuda:
            start = cuda_peak_start(self.device)
            train = self._timed(lambda: self.train_step(v, model))
            return {"train": train, "train_peak_mib": cuda_peak_mib(self.device, start)}
        return {"train": self._timed(lambda: self.train_step(v, model))}

    def record_stats(self, v: Variant) -> None:
        """Execute/overflow fractions of one eval forward and one train step (Gumbel gates)."""
        if v.mode == "dense":
            return
        entry = {}
        for phase, fn in (("eval", self.forward), ("train", self.train_step)):
            fn(v)
            s = routing_stats(self.routed)
            tokens = sum(layer[k]["tokens"] for layer in s["layers"] for k in ("attn", "mlp"))
            overflow = sum(layer[k]["overflow"] for layer in s["layers"] for k in ("attn", "mlp"))
            entry[phase] = {"attn_execute": s["attn_execute"], "mlp_execute": s["mlp_execute"],
                            "overflow_frac": overflow / max(tokens, 1)}
        self.stats[v.name] = entry


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def summarise(results, vs: list[Variant], parts, stats) -> list[dict]:
    rows = []
    for v in vs:
        dense = results[v.baseline]
        d_fwd, d_train = median(dense["forward"]), median(dense["train"])
        fwd, train = median(results[v.name]["forward"]), median(results[v.name]["train"])
        row = {"variant": v.name, "mode": v.mode, "capacity": v.capacity, "kv_policy": v.kv_policy,
               "forward_ms": 1e3 * fwd, "train_ms": 1e3 * train,
               "compiled": v.compiled, "baseline": v.baseline,
               "forward_ratio": fwd / d_fwd, "train_ratio": train / d_train,
               # medians of the per-repeat paired ratios (each repeat's variant over that repeat's dense)
               "forward_ratio_paired": median([a / b for a, b in zip(results[v.name]["forward"],
                                                                     dense["forward"])]),
               "train_ratio_paired": median([a / b for a, b in zip(results[v.name]["train"],
                                                                   dense["train"])]),
               "forward_ms_min": 1e3 * min(results[v.name]["forward"]),
               "train_ms_min": 1e3 * min(results[v.name]["train"]),
               # ratio of the fastest repeats: less sensitive to other processes' load than the medians
               "forward_ratio_min": min(results[v.name]["forward"]) / min(dense["forward"]),
               "train_ratio_min": min(results[v.name]["train"]) / min(dense["train"]),
               "forward_ms_all": [1e3 * t for t in results[v.name]["forward"]],
               "train_ms_all": [1e3 * t for t in results[v.name]["train"]]}
        for key, metric in (("forward_page_faults", "forward_faults"), ("forward_peak_mib", "forward_peak_mib"),
                            ("train_peak_mib", "train_peak_mib")):
            if metric in results[v.name]:  # cpu: page faults; cuda: peak allocated above the resident memory
                row[key] = median(results[v.name][metric])
        if v.mode == "capacity":
            # (per-layer plans: the layer mean, exact for kv_policy=all where every cost is linear in the slots;
            # under routed the attention term is a mean of squares, so the mean's square slightly underestimates)
            attn, mlp = v.mean_capacity()
            if v.plan is not None:
                row["mean_capacity"] = {"attn": attn, "mlp": mlp}
            row["ideal_forward"] = ideal_ratio(parts, attn, v.kv_policy, mlp=mlp)
            row["ideal_train"] = row["ideal_forward"]
            row["ideal_train_refined"] = ideal_ratio(parts, attn, v.kv_policy, train=True, mlp=mlp)
            row["forward_gap"] = row["forward_ratio"] - row["ideal_forward"]
            row["train_gap"] = row["train_ratio"] - row["ideal_train"]
            row["meets_target"] = bool(row["forward_gap"] <= TARGET_FWD and row["train_gap"] <= TARGET_TRAIN)
        elif v.mode == "mask":
            row["ideal_forward"] = row["ideal_train"] = 1.0
            # an expectation, not a target: mask runs every sublayer plus the routing, but its blocked, key-trimmed
            # CPU attention can beat the dense model's single is_causal SDPA call
            row["as_expected"] = bool(row["forward_ratio"] >= 1.0 and row["train_ratio"] >= 1.0)
        else:
            row["ideal_forward"] = row["ideal_train"] = 1.0
        if v.name in stats:
            row["routing"] = stats[v.name]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cuda = bool(rows) and "forward_peak_mib" in rows[0]
    mem_head = "peak MiB" if cuda else "faults"
    head = (f"{'variant':<28}{'fwd ms':>9}{'fwd x':>8}{'(min)':>7}{'ideal':>7}{'train ms':>10}{'train x':>9}"
            f"{'(min)':>7}{'ideal':>7}{'(refined)':>10}{'exec a/m (eval)':>17}{'exec a/m (train)':>18}"
            f"{'overflow':>10}{mem_head:>10}  target")
    print(head)
    print("-" * len(head))
    for r in rows:
        st = r.get("routing")
        ev = f"{st['eval']['attn_execute']:.3f}/{st['eval']['mlp_execute']:.3f}" if st else "-"
        tr = f"{st['train']['attn_execute']:.3f}/{st['train']['mlp_execute']:.3f}" if st else "-"
        of = f"{st['eval']['overflow_frac']:.3f}" if st else "-"
        refined = f"{r['ideal_train_refined']:.3f}" if "ideal_train_refined" in r else "-"
        target = {True: "ok", False: "MISS"}.get(r.get("meets_target"), "")
        if "as_expected" in r:
            target = ">= 1.0" if r["as_expected"] else "< 1.0 (attention)"
        mem = r["forward_peak_mib"] if cuda else r["forward_page_faults"]
        print(f"{r['variant']:<28}{r['forward_ms']:>9.1f}{r['forward_ratio']:>8.3f}{r['forward_ratio_min']:>7.3f}"
              f"{r['ideal_forward']:>7.3f}{r['train_ms']:>10.1f}{r['train_ratio']:>9.3f}{r['train_ratio_min']:>7.3f}"
              f"{r['ideal_train']:>7.3f}{refined:>10}{ev:>17}{tr:>18}{of:>10}{mem:>10.0f}  {target}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, help="default 5 (--quick: 2)")
    p.add_argument("--seq-len", type=int, help="default 1024 (--quick: 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, help="default: the shape's (smollm2 30, --quick 4; llama2-7b-4l 4)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                   help="random-weight model shape: smollm2 (SmolLM2-135M, default) or llama2-7b-4l (4 layers of "
                        "Llama-2-7B)")
    add_device_options(p, default_dtype_cpu="float32", default_dtype_cuda="bfloat16")
    p.add_argument("--kv-policy", choices=("all", "routed", "both"), default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd dense and capacity variants (inductor; ratios vs compiled dense)")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of --compile (reduce-overhead: CUDA graphs on cuda)")
    p.add_argument("--warmup", type=int, help="untimed forwards + train steps per variant before timing, after the "
                                              "one that records routing statistics (default 0 on cpu, 3 on cuda)")
    p.add_argument("--iters", type=int, help="calls per measurement, timed back to back (default 1 on cpu, 5 on cuda)")
    add_allocator_option(p)
    p.add_argument("--recipe", default="slurm/configs/stage1_70b.yaml",
                   help="training config whose capacities (per kind, per layer: capacity_plan=warm_start) get a "
                        "`recipe` variant; 'none' to leave it out (default: the cluster stage-1 config, the recipe "
                        "bench/quality.py measures)")
    p.add_argument("--quick", action="store_true", help="smoke run: seq 256, 2 repeats, 4 layers (explicit flags win)")
    args = p.parse_args(argv)
    resolve_device_options(args)
    shape_layers = SHAPES[args.shape]["num_hidden_layers"]
    defaults = dict(layers=min(4, shape_layers), seq_len=256, repeats=2) if args.quick else \
        dict(layers=shape_layers, seq_len=1024, repeats=5)
    cuda = args.device == "cuda"
    defaults.update(warmup=3 if cuda else 0, iters=5 if cuda else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile_mode == "default":
        args.compile_mode = None
    if args.compile_mode and not args.compile:
        p.error("--compile-mode needs --compile")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = device_allocator(args)  # before any model memory: the heap it grows stays
    kv_policies = ["all", "routed"] if args.kv_policy == "both" else [args.kv_policy]
    dense, routed, shape = build_models(args.layers, args.seq_len, args.shape, getattr(torch, args.dtype),
                                        args.device)
    ids = torch.randint(0, shape.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    states = router_settings(routed, ids, mask_capacity=1.0 - SKIPS[0])
    bench = Bench(dense, routed, states, ids, compiled=args.compile, device=args.device, iters=args.iters,
                  compile_mode=args.compile_mode)
    recipe = None if args.recipe == "none" else recipe_plan(args.recipe, args.layers)
    if recipe is not None:
        print(f"recipe {args.recipe}: attention slots per layer {list(recipe[0])}, MLP {list(recipe[1])}")
    vs = variants(kv_policies, compiled=args.compile, recipe=recipe)
    by_name = {v.name: v for v in vs}

    parts = flop_parts(shape, args.seq_len)
    ref_parts = flop_parts(Shape(30, 576, 9, 3, 64, 1536, 49152), 1024)  # the facts.md sanity check
    sanity = {f"{kv}_skip{int(100 * s)}": round(ideal_ratio(ref_parts, 1 - s, kv), 4)
              for kv in ("all", "routed") for s in SKIPS}
    print(f"load average at start: {loadavg()} (other processes skew timings; medians and round-robin limit it)")
    where = device_record(args.device)
    print(f"{args.shape} shape (random weights), {args.layers} layers, batch {args.batch}, seq {args.seq_len}, "
          f"{args.dtype}, {args.device} ({where['device_name']}), {args.threads} threads, {args.repeats} repeats "
          f"(round-robin) x {args.iters} call(s) per measurement, {args.warmup} warm-up call(s), "
          f"torch {torch.__version__}")
    print("routed variants: routers.inference_slots=static (k = ceil(capacity * S) slots; no host read of the "
          "decisions)" + (f"; compiled: mode {args.compile_mode or 'default'}" if args.compile else ""))
    print("FLOP shares at this shape/seq: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in flop_shares(parts).items()))
    print("Ideal forward ratios for 30 layers, seq 1024 (facts.md: all 0.807 / 0.692): " +
          ", ".join(f"{k} {v:.3f}" for k, v in sanity.items()))

    for v in vs:  # warm-up (one forward + one train step each) that also records the routing statistics
        if v.mode == "dense":
            bench.forward(v)
            bench.train_step(v)
        else:
            bench.record_stats(v)
        for _ in range(args.warmup):  # (cuda: kernels, autotuning, the caching allocator's pools, compiled graphs)
            bench.forward(v)
            bench.train_step(v)
    # Forwards and train steps in separate round-robin phases: a forward timed right after another variant's
    # backward pass starts from that pass's caches and heap, which neither inference nor training ever does.
    names = [v.name for v in vs]
    results = round_robin(names, args.repeats, lambda name: bench.measure_forward(by_name[name]),
                          label="forward ")
    train = round_robin(names, args.repeats, lambda name: bench.measure_train(by_name[name]), label="train step ")
    for name, metrics in train.items():
        results[name].update(metrics)
    rows = summarise(results, vs, parts, bench.stats)
    print()
    print_table(rows)
    print("\nx = median time / median dense time (+compile rows: / median dense+compile time) ((min) = fastest "
          "repeat / fastest dense repeat); ideal = FLOP ratio (train ideal = forward ideal, as the issue sets it; refined = frozen-base backward weighting). "
          "exec a/m = executed fraction attention/MLP; overflow = router-chosen tokens without a slot; " +
          ("peak MiB = median peak torch.cuda.max_memory_allocated above the resident memory per timed forward."
           if args.device == "cuda" else "faults = median minor page faults per timed forward."))
    print(f"load average during the run: {loadavg()}")
    print(f"targets: capacity ratio <= ideal + {TARGET_FWD} (forward) / + {TARGET_TRAIN} (train). mask is expected "
          ">= 1.0 (it runs every sublayer); it can go below where its blocked SDPA beats dense's is_causal SDPA")
    record = {"bench": "routed_forward", **where, "dtype": args.dtype, "shape": args.shape,
              "inference_slots": "static", "compile": args.compile, "compile_mode": args.compile_mode,
              "layers": args.layers, "seq_len": args.seq_len, "batch": args.batch,
              "repeats": args.repeats, "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
              "allocator": allocator,
              "loadavg_end": loadavg(), "flop_shares": flop_shares(parts), "sanity_ideal_30L_1024": sanity, "variants": rows}
    if args.device == "cuda":
        # resident: the models' weights (dense, routed, + the compiled dense copy) and the allocator's live blocks
        record["cuda_resident_mib"] = torch.cuda.memory_allocated() / 2 ** 20
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
