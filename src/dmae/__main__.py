import sys

from dmae.cli import main

sys.exit(main())
