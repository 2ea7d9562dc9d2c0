"""Stage 2 on Symile-MIMIC: the Labs DAE teacher and (later) PaCX cross-modal distillation.

The LightningModule is chosen by the config's ``model.class_path``:

    python Stage2_PACX.py fit --config configs/stage2/labs_dae.yaml --data.root /data/symile/data_npy
"""

from pacx.cli import cli_main
from pacx.data.symile import SymileMIMICDataModule
from pacx.lit.common import StagedModule


def main(args: list[str] | None = None):
    return cli_main(StagedModule, SymileMIMICDataModule, args=args, subclass_mode_model=True)


if __name__ == "__main__":
    main()
