"""Stage 2: PaCX cross-modal distillation on Symile-MIMIC (the teachers train with
``python -m pacx.teachers``).

    python Stage2_PACX.py fit --config configs/stage2/pacx_vitb_symile.yaml --data.root /data/symile/data_npy
"""

import sys
import warnings

from pacx import teacher_cli as teachers
from pacx.cli import cli_main
from pacx.data.symile import SymileMIMICDataModule
from pacx.lit.pacx import PaCXModule


def main(args: list[str] | None = None):
    if teachers.names_teacher(sys.argv[1:] if args is None else args):  # until the next release
        warnings.warn("Stage2_PACX.py trains PaCX only: train teachers with `python -m pacx.teachers fit "
                      "--config ...` (configs/teachers/); running it there", FutureWarning, stacklevel=2)
        return teachers.main(args)
    return cli_main(PaCXModule, SymileMIMICDataModule, args=args, program=__file__, subclass_mode_model=True)


if __name__ == "__main__":
    main()
