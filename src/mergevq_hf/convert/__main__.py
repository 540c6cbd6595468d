import sys

from .official import main

sys.exit(main())
