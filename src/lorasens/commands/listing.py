"""`lorasens presets | datasets | strategies`: the closed vocabularies, one line each."""

from __future__ import annotations


def add_parser(sub) -> None:
    for name, func, text in (
        ("presets", list_presets, "List the named presets."),
        ("datasets", list_datasets, "List the registered datasets."),
        ("strategies", list_strategies, "List the phase strategies and the schedule syntax."),
    ):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func, _subparser=p)


def list_presets(args) -> int:
    from lorasens.presets import describe_presets

    for name, description in describe_presets():
        print(f"{name:18s} {description}")
    return 0


def list_datasets(args) -> int:
    from lorasens.data.registry import registered_datasets

    for name, spec in sorted(registered_datasets().items()):
        print(f"{name:12s} {spec.description}")
    return 0


def list_strategies(args) -> int:
    from lorasens.schedule import NAMED_STRATEGIES

    for name, expansion in NAMED_STRATEGIES.items():
        print(f"{name:18s} {expansion}")
    print(f"{'lisa:layers=K,interval=N':18s} K random layers (seeded) train, resampled every N steps")
    print(f"{'GROUP[@LAYERS]->...':18s} GROUP: attn, mlp, both or module types (q,v); LAYERS: 0-10 or 0-50%")
    return 0
