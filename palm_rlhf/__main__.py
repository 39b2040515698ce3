import sys

from palm_rlhf.cli import main

sys.exit(main())
