"""Deploy Center plugin: ``deploy.shell`` runs a script on the target host."""
