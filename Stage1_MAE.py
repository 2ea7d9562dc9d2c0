"""Stage 1: MAE pretraining of the ViT encoder on CheXpert.

    python Stage1_MAE.py fit --config configs/stage1/mae_vitb_chexpert.yaml --data.root /data/chexpert
"""

from pacx.cli import cli_main
from pacx.data.chexpert import CheXpertDataModule
from pacx.lit.mae import MAEModule


def main(args: list[str] | None = None):
    return cli_main(MAEModule, CheXpertDataModule, args=args, program=__file__)


if __name__ == "__main__":
    main()
