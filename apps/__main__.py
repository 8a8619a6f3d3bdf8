import sys

from pocketlm.apps.cli import main

sys.exit(main())
