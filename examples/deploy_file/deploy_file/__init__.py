"""A Deploy Center plugin: the ``deploy.file`` deploy type and its ``file_restore`` rollback."""
