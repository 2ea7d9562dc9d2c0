"""Stage 3: classification (linear probe / fine-tune) or segmentation on one benchmark.

    python Stage3_eval.py fit --config configs/stage3/linear_probe.yaml --config configs/stage3/lp/tb.yaml \
        --model.backbone.kind pacx --model.backbone.weights runs/stage2/<run> --data.root /data/tb \
        --data.manifest_dir /data/manifests/tb
    python Stage3_eval.py fit --config configs/stage3/segmentation.yaml \
        --config configs/stage3/seg/cxlseg.yaml --model.backbone.weights …
    python Stage3_eval.py predict --config configs/stage3/linear_probe.yaml \
        --config configs/stage3/lp/tb.yaml --model.backbone.weights … \
        --data.manifest my_images.csv --embeddings_out emb.npy

``fit`` trains, then tests the best checkpoint. The config's ``class_path`` entries pick the module pair
(classification or segmentation); ``data.benchmark`` and ``data.img_size`` are linked to the model.
"""

from pacx.cli import EvalCLI, cli_main
from pacx.data.stage3 import SplitsDataModule
from pacx.lit.common import BenchmarkEvalModule


def main(args: list[str] | None = None):
    return cli_main(BenchmarkEvalModule, SplitsDataModule, args=args, cli_class=EvalCLI, program=__file__)


if __name__ == "__main__":
    main()
