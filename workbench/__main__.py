"""`python -m workbench` is the `workbench` CLI."""

from workbench.cli import main

raise SystemExit(main())
