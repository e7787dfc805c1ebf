"""`python -m ticketfarm`: the ticketfarm command."""
import sys

from ticketfarm.cli import main

sys.exit(main())
