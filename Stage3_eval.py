"""Stage 3: linear probe / fine-tune on a classification benchmark; ``fit`` trains, then tests the best checkpoint.

    python Stage3_eval.py fit --config configs/stage3/tb.yaml --model.backbone_kind pacx \
        --model.backbone_weights runs/stage2/<run> --data.root /data/tb --data.manifest_dir /data/manifests/tb

``model.benchmark`` is linked from ``data.benchmark`` (set once, in the config).
"""

from pacx.cli import EvalCLI, cli_main
from pacx.data.benchmark_dm import BenchmarkDataModule
from pacx.lit.classify import ClassificationModule


def main(args: list[str] | None = None):
    return cli_main(ClassificationModule, BenchmarkDataModule, args=args, cli_class=EvalCLI)


if __name__ == "__main__":
    main()
