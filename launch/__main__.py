"""`python -m launch ...` is `dist-bn-launch ...`."""
from launch.cli import main

raise SystemExit(main())
