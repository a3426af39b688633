import sys

from nativevl.cli import main

sys.exit(main())
