"""`vlp` commands beyond Lightning's fit / validate / test / predict: one module per command, each with
`main(argv) -> exit code` (dispatched by `vlp_lightning.cli.main`)."""
