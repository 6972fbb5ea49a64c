"""One module per role; each defines the role's actor. `python -m roles ROLE` runs one."""
