"""Phase schedules as data: parsed once from a strategy string, testable without a model.

Grammar (any number of phases):   PHASE ( "->" PHASE )*
    PHASE  = GROUP [ "@" LAYERS ]
    GROUP  = attn | attention | mlp | both | TYPE("," TYPE)*      e.g. q,v  or  q_proj,v_proj,down_proj
    LAYERS = A-B (inclusive layer indices) | A%-B% or A-B% (a share of the model's layers)
Named strategies: both->mlp->attn, attn->mlp->both, both->mlp->both, early->late (= both@0-50% -> both@50-100%,
L0-10 / L11-21 on TinyLlama's 22 layers), and lisa:layers=K,interval=N (K layers sampled every N steps, seeded).

Phase boundaries: N phases need N-1 end steps (`--phase_ends 300,600` or `--phase1_end/--phase2_end`, or
fractions of max_steps such as `0.2,0.4`); the last phase runs to max_steps. Without boundaries, phases are equal.
Step semantics: a phase that ends at step E covers optimizer steps up to and including E, so `checkpoint-E` holds
the weights at the end of that phase.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lorasens.errors import UserError
from lorasens.model.module_map import GROUPS, LoraModule, ModuleMap

NAMED_STRATEGIES = {
    "both->mlp->attn": "both->mlp->attn",
    "attn->mlp->both": "attn->mlp->both",
    "both->mlp->both": "both->mlp->both",
    "early->late": "both@0-50%->both@50-100%",
}
GROUP_WORDS = {"attn": ("attn",), "attention": ("attn",), "mlp": ("mlp",), "both": GROUPS}


@dataclass(frozen=True)
class LayerRange:
    start: float
    end: float  # inclusive for indices; exclusive share for percentages
    percent: bool

    def resolve(self, num_layers: int) -> tuple[int, ...]:
        if self.percent:
            first, stop = int(self.start * num_layers // 100), int(self.end * num_layers // 100)
        else:
            first, stop = int(self.start), int(self.end) + 1
            if stop > num_layers:
                raise UserError(f"layer range {self} goes beyond this model's {num_layers} layers (0-{num_layers - 1})")
        if stop <= first:
            raise UserError(f"layer range {self} is empty for a model with {num_layers} layers")
        return tuple(range(first, stop))

    def __str__(self) -> str:
        if self.percent:
            return f"{self.start:g}-{self.end:g}%"
        return f"{int(self.start)}-{int(self.end)}"


@dataclass(frozen=True)
class PhaseSpec:
    """Which modules train in one phase: (groups OR module types) x layers."""

    groups: tuple[str, ...] | None
    module_types: tuple[str, ...] | None
    layers: LayerRange | None
    text: str

    def modules(self, module_map: ModuleMap) -> tuple[LoraModule, ...]:
        layers = self.layers.resolve(module_map.num_layers) if self.layers else None
        types = resolve_module_types(self.module_types, module_map) if self.module_types else None
        chosen = module_map.select(groups=self.groups, layers=layers, module_types=types)
        if not chosen:
            raise UserError(f"phase {self.text!r} would train nothing on this model")
        return chosen


@dataclass(frozen=True)
class Lisa:
    layers: int
    interval: int

    def layers_for_block(self, block: int, num_layers: int, seed: int) -> tuple[int, ...]:
        if self.layers > num_layers:
            raise UserError(f"lisa:layers={self.layers} exceeds this model's {num_layers} layers")
        return tuple(sorted(random.Random(f"lisa-{seed}-{block}").sample(range(num_layers), self.layers)))


@dataclass(frozen=True)
class Schedule:
    strategy: str
    phases: tuple[PhaseSpec, ...]
    ends: tuple[int, ...]  # end step of each phase; the last equals max_steps
    lisa: Lisa | None = None
    seed: int = 0  # the run's seed: which layers LISA samples in each block

    def phase_index(self, global_step: int) -> int:
        """Phase of the optimizer step that follows `global_step` completed steps."""
        if self.lisa:
            return global_step // self.lisa.interval
        for index, end in enumerate(self.ends):
            if global_step < end:
                return index
        return len(self.ends) - 1

    def label(self, index: int, module_map: ModuleMap | None = None) -> str:
        if self.lisa:
            layers = self.lisa.layers_for_block(index, module_map.num_layers, self.seed) if module_map else "?"
            return f"lisa{list(layers)}".replace(" ", "")
        return self.phases[index].text

    def modules(self, index: int, module_map: ModuleMap) -> tuple[LoraModule, ...]:
        if self.lisa:
            return module_map.select(layers=self.lisa.layers_for_block(index, module_map.num_layers, self.seed))
        return self.phases[index].modules(module_map)

    def all_modules(self, module_map: ModuleMap) -> tuple[LoraModule, ...]:
        """Every module that trains in some phase: these get LoRA (and are in the optimizer from step 0)."""
        if self.lisa:
            return module_map.modules
        used = {m for i in range(len(self.phases)) for m in self.modules(i, module_map)}
        return tuple(m for m in module_map.modules if m in used)

    def boundaries(self) -> tuple[int, ...]:
        return self.ends[:-1] if not self.lisa else ()


_LAYERS = re.compile(r"^(\d+(?:\.\d+)?)(%?)-(\d+(?:\.\d+)?)(%?)$")


def _parse_layers(text: str, phase: str) -> LayerRange:
    match = _LAYERS.match(text.strip())
    if not match:
        raise UserError(f"bad layer range {text!r} in phase {phase!r}; use A-B (e.g. 0-10) or A-B% (e.g. 0-50%)")
    a, pa, b, pb = match.groups()
    percent = bool(pa or pb)
    start, end = float(a), float(b)
    if percent and not (0 <= start < end <= 100):
        raise UserError(f"empty or invalid layer share {text!r} in phase {phase!r} (need 0 <= A < B <= 100)")
    if not percent and (not a.isdigit() or not b.isdigit() or end < start):
        raise UserError(f"empty layer range {text!r} in phase {phase!r} (need integers A <= B)")
    return LayerRange(start, end, percent)


def _parse_phase(text: str) -> PhaseSpec:
    text = text.strip()
    group_text, at, layer_text = text.partition("@")
    group_text = group_text.strip()
    if not group_text:
        raise UserError(f"empty phase in schedule near {text!r}")
    # "attn@" with nothing after the @ is a typo, not "all layers".
    layers = _parse_layers(layer_text, text) if at else None
    if group_text in GROUP_WORDS:
        return PhaseSpec(GROUP_WORDS[group_text], None, layers, text)
    types = tuple(t.strip() for t in group_text.split(",") if t.strip())
    if not types:
        # "," alone would otherwise mean "no type restriction", i.e. silently train everything.
        raise UserError(f"phase {text!r} names no module group or type; use attn, mlp, both or types such as q,v")
    for t in types:
        if not re.fullmatch(r"[A-Za-z_][\w.]*", t):
            raise UserError(f"unknown group or module type {t!r}; use attn, mlp, both or module types such as q,v")
    return PhaseSpec(None, types, layers, text)


def resolve_module_types(types: tuple[str, ...], module_map: ModuleMap) -> tuple[str, ...]:
    """Map short names (q, v, gate) to the model's module types (q_proj, v_proj, gate_proj)."""
    valid = module_map.module_types
    out = []
    for t in types:
        if t in valid:
            out.append(t)
        elif f"{t}_proj" in valid:
            out.append(f"{t}_proj")
        else:
            raise UserError(f"unknown module type {t!r} for {module_map.architecture}; valid: attn, mlp, both, {', '.join(valid)}")
    return tuple(out)


def parse_phases(strategy: str) -> tuple[tuple[PhaseSpec, ...], Lisa | None]:
    strategy = strategy.strip()
    if strategy.startswith("lisa"):
        return (), _parse_lisa(strategy)
    expanded = NAMED_STRATEGIES.get(strategy, strategy)
    parts = expanded.split("->")
    if len(parts) < 2 and "@" not in expanded:
        # A single group without layers is a static target, not a schedule: say so instead of guessing.
        raise UserError(
            f"strategy {strategy!r} has one phase; use --target for a static run, or one of: "
            f"{', '.join(NAMED_STRATEGIES)}, lisa:layers=K,interval=N, or GROUP[@LAYERS]->GROUP[@LAYERS]"
        )
    return tuple(_parse_phase(p) for p in parts), None


def _parse_lisa(text: str) -> Lisa:
    match = re.fullmatch(r"lisa:(.*)", text)
    options = dict(kv.split("=", 1) for kv in match.group(1).split(",") if "=" in kv) if match else {}
    if not match or set(options) != {"layers", "interval"} or not all(v.isdigit() and int(v) > 0 for v in options.values()):
        raise UserError(f"bad LISA strategy {text!r}; use lisa:layers=K,interval=N with positive integers")
    return Lisa(int(options["layers"]), int(options["interval"]))


def resolve_ends(num_phases: int, max_steps: int, phase_ends: str | None, phase1_end: int | None, phase2_end: int | None) -> tuple[int, ...]:
    if phase_ends and (phase1_end is not None or phase2_end is not None):
        raise UserError("give either --phase_ends or --phase1_end/--phase2_end, not both")
    if phase_ends:
        items = [s.strip() for s in phase_ends.split(",") if s.strip()]
        try:
            values = [float(s) for s in items]
        except ValueError:
            raise UserError(f"--phase_ends must be numbers, got {phase_ends!r}") from None
        if all("." in s for s in items) and all(0 < v < 1 for v in values):
            ends = [round(v * max_steps) for v in values]
        elif all(v.is_integer() for v in values):
            ends = [int(v) for v in values]
        else:
            raise UserError(f"--phase_ends {phase_ends!r} mixes fractions and steps; use all steps (300,600) or all fractions (0.2,0.4)")
    elif phase1_end is not None or phase2_end is not None:
        if phase1_end is None:
            raise UserError("--phase2_end needs --phase1_end")
        ends = [phase1_end] + ([phase2_end] if phase2_end is not None else [])
    else:
        ends = [round(max_steps * (i + 1) / num_phases) for i in range(num_phases - 1)]
    if len(ends) == num_phases and ends[-1] == max_steps:
        ends = ends[:-1]
    if len(ends) != num_phases - 1:
        raise UserError(f"{num_phases} phases need {num_phases - 1} boundaries, got {len(ends)}: {ends}")
    previous = 0
    for end in ends:
        if end <= previous:
            raise UserError(f"phase boundaries must be strictly increasing and > 0, got {ends}")
        previous = end
    if ends and ends[-1] >= max_steps:
        raise UserError(f"phase boundary {ends[-1]} is not below --max_steps {max_steps}; the last phase would be empty")
    return tuple(ends) + (max_steps,)


def parse_schedule(
    strategy: str,
    max_steps: int,
    phase_ends: str | None = None,
    phase1_end: int | None = None,
    phase2_end: int | None = None,
    module_map: ModuleMap | None = None,
    seed: int = 0,
) -> Schedule:
    phases, lisa = parse_phases(strategy)
    if lisa:
        if phase_ends or phase1_end is not None or phase2_end is not None:
            raise UserError("LISA samples layers every `interval` steps; it takes no phase boundaries")
        n_blocks = -(-max_steps // lisa.interval)
        ends = tuple(min((i + 1) * lisa.interval, max_steps) for i in range(n_blocks))
        schedule = Schedule(strategy, (), ends, lisa, seed)
    else:
        ends = resolve_ends(len(phases), max_steps, phase_ends, phase1_end, phase2_end)
        schedule = Schedule(strategy, phases, ends, seed=seed)
    if module_map is not None:
        if lisa:
            lisa.layers_for_block(0, module_map.num_layers, 0)
        for index in range(len(schedule.phases)):
            schedule.modules(index, module_map)  # raises on unknown types, bad layers, empty phases
    return schedule


def parse_schedule_from_config(cfg, module_map: ModuleMap | None = None) -> Schedule:
    s = cfg.schedule
    return parse_schedule(s.phase_strategy, cfg.training.max_steps, s.phase_ends, s.phase1_end, s.phase2_end, module_map,
                          seed=cfg.training.seed)
