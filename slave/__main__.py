"""`python -m slave`: the slave daemon."""
import sys

from slave.daemon import main

sys.exit(main())
