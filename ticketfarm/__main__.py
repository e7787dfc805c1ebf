"""`python -m ticketfarm`: the ticketfarm command."""
from ticketfarm.cli import entry

entry()
