"""The subcommands, one module per area; importing a module registers its commands on `cli`."""
