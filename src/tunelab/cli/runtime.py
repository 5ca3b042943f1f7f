"""`tunelab runtime`: the kernels measured on this machine and what `runtime.linear auto` picks."""

from __future__ import annotations

import json


def cmd_runtime(a) -> None:
    from tunelab.runtime import choose, resolve

    found = choose.measured(rerun=a.rerun)
    rt = resolve(a.linear, a.allocator, a.attention)  # the cached table, environment applied
    if a.json:
        return print(
            json.dumps(
                {
                    **found,
                    "cache": str(choose.cache_path(found["machine"])),
                    "resolved": rt.record(),
                }
            )
        )
    print(choose.format_table(found))
    print(
        f"resolved here (runtime.linear {rt.linear}): "
        + ", ".join(f"{c} {k}" for c, k in rt.kernels.items())
    )
    print(f"  ({rt.source}); allocator {rt.allocator}, attention {rt.attention}")
    print(
        "overrides: TUNELAB_ONEDNN=0|1 (runtime.linear torch|onednn), TUNELAB_MALLOC=0|1 "
        "(runtime.allocator system|keep), TUNELAB_VARLEN=rows|mask|nested (runtime.attention)"
    )


def register(sub) -> None:
    p = sub.add_parser(
        "runtime",
        help="the CPU kernels measured on this machine and the ones runtime.linear auto picks",
        description="Shows the table measured once per machine (cached under $TUNELAB_CACHE/"
        "runtime): each candidate kernel's time per shape class, and the choice.",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="measure again (about 20 s on 2 CPUs; on an idle machine)",
    )
    p.add_argument(
        "--linear",
        default="auto",
        choices=["auto", "torch", "onednn"],
        help="resolve this runtime.linear value [auto]",
    )
    p.add_argument("--allocator", default="auto", choices=["auto", "keep", "system"], help="[auto]")
    p.add_argument(
        "--attention", default="auto", choices=["auto", "rows", "mask", "nested"], help="[auto]"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_runtime)
