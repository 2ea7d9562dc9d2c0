"""``python -m pacx.teachers fit --config configs/teachers/labs_dae.yaml --data.root DIR``: train a teacher
(:mod:`pacx.teacher_cli`). An entry point inside the package it is named after; pyproject's import contract
lists this one upward import by name."""

from pacx.teacher_cli import main

if __name__ == "__main__":
    main()
