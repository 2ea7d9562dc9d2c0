"""Stage 3: frozen-backbone segmentation on a segmentation benchmark; ``fit`` trains, then tests the best checkpoint.

    python Stage3_segment.py fit --config configs/stage3/seg/cxlseg.yaml --model.backbone_kind pacx \
        --model.backbone_weights runs/stage2/<run> --data.root <image root> --data.manifest_dir <manifests>

``model.benchmark`` is linked from ``data.benchmark`` (set once, in the config).
"""

from pacx.cli import EvalCLI, cli_main
from pacx.data.seg_dataset import SegmentationDataModule
from pacx.lit.segment import SegmentationModule


def main(args: list[str] | None = None):
    return cli_main(SegmentationModule, SegmentationDataModule, args=args, cli_class=EvalCLI)


if __name__ == "__main__":
    main()
