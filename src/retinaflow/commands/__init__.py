"""The CLI subcommands, one module per group; ``retinaflow.cli`` assembles them."""
