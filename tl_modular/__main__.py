"""``python -m tl_modular ...`` = ``tl-modular ...`` (what ``torchrun -m tl_modular analyze`` runs)."""

from tl_modular.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
