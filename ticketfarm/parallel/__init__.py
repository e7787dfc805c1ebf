"""`ticketfarm parallel`: GNU parallel's command line, run as a ticketfarm sweep (docs/PARALLEL.md)."""
