"""Print the parameter count of every FIAS variant (and of the Table 3 ablations of FIAS-tiny).

    python scripts/count_parameters.py --out_channels 9
"""

import fire

from fias_monai.networks import FIAS, FIAS_VARIANTS


def count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def main(in_channels: int = 1, out_channels: int = 9) -> None:
    print(f"| network (in={in_channels}, classes={out_channels}) | parameters |")
    print("|---|---:|")
    for variant in FIAS_VARIANTS:
        print(f"| FIAS-{variant} | {count(FIAS(in_channels, out_channels, variant)):,} |")
    for name, kw in (("no DMK", dict(use_dmk=False)), ("Summation fusion", dict(fusion="sum")),
                     ("no MixAtt", dict(decoder="conv"))):
        print(f"| FIAS-tiny, {name} | {count(FIAS(in_channels, out_channels, 'tiny', **kw)):,} |")


if __name__ == "__main__":
    fire.Fire(main)
