"""Persistence: robustvit's verified Hub format (:mod:`robustvit.persistence.hub`), the certificate-free formats of
timm and transformers (:mod:`~robustvit.persistence.timm_native`, :mod:`~robustvit.persistence.transformers_native`,
:mod:`~robustvit.persistence.transformers_auto`), and what they share: rebuilding a converted architecture from its
record (:mod:`~robustvit.persistence.rebuild`) and loading weights strictly (:mod:`~robustvit.persistence.weights`).

Importing this package registers the libraries' loaders of converted models: timm's ``robustvit`` entrypoint and
transformers' Auto classes for the ``robustvit_*`` model types (``robustvit.convert`` imports it, so a converted
model never exists without them).
"""

from robustvit.persistence import timm_native, transformers_auto  # noqa: F401  (registration)
