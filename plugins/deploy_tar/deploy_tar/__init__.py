"""Deploy Center plugin: ``deploy.tar`` installs a tar.gz package as a new release, and the
``release`` rollback strategy switches back to the release before it.

Layout on the target host::

    target_dir/
      current -> releases/<deploy id>     the live release (a symlink, swapped atomically)
      releases/<deploy id>/               one directory per deployment, extracted safely
      releases.json                       the releases in the order they were made
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
