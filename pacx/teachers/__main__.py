"""``python -m pacx.teachers fit --config configs/teachers/labs_dae.yaml --data.root DIR``: train a teacher
(:mod:`pacx.teachers.train`)."""

from pacx.teachers.train import main

if __name__ == "__main__":
    main()
