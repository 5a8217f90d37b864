"""`python -m dist_bn.verify`: the dist-bn-verify command (dist_bn/verify/cli.py)."""
import sys

from dist_bn.verify.cli import main

sys.exit(main())
