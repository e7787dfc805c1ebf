"""`python -m master.web`: the HTTP process (see master/web/process.py)."""
import sys

from master.web.process import main

sys.exit(main())
