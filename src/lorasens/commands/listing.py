"""`lorasens presets | datasets | strategies`: the closed vocabularies, one line each."""

from __future__ import annotations

from lorasens.data.registry import registered_datasets
from lorasens.presets import describe_presets


def add_parser(sub) -> None:
    for name, func, text in (
        ("presets", list_presets, "List the named presets."),
        ("datasets", list_datasets, "List the registered datasets."),
        ("strategies", list_strategies, "List the phase strategies and the schedule syntax."),
    ):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func, _subparser=p)


def list_presets(args) -> int:
    for name, description in describe_presets():
        print(f"{name:18s} {description}")
    return 0


def list_datasets(args) -> int:
    for name, spec in sorted(registered_datasets().items()):
        print(f"{name:12s} {spec.description} [analysis split: {spec.analysis_samples} examples]")
    return 0


def list_strategies(args) -> int:
    # Imported when the command runs, not at start-up: torch (through the module map) cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.model.schedule import NAMED_STRATEGIES

    for name, expansion in NAMED_STRATEGIES.items():
        print(f"{name:18s} {expansion}")
    print(f"{'lisa:layers=K,interval=N':18s} K random layers (seeded) train, resampled every N steps")
    print(f"{'GROUP[@LAYERS]->...':18s} GROUP: attn, mlp, both or module types (q,v); LAYERS: 0-10 or 0-50%")
    return 0
