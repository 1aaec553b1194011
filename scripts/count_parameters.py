"""Print the parameter count of every FIAS variant (and of the Table 3 ablations of FIAS-tiny).

    python scripts/count_parameters.py --out_channels 9

The same table as ``python -m fias_monai params``; the counting lives in :mod:`fias_monai.params`.
"""

import fire

from fias_monai.params import parameter_table, parameter_table_markdown


def main(in_channels: int = 1, out_channels: int = 9) -> None:
    rows = parameter_table(in_channels, out_channels)
    print(parameter_table_markdown(rows, in_channels, out_channels), end="")


if __name__ == "__main__":
    fire.Fire(main)
