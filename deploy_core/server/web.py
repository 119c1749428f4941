"""The old home of the HTTP helpers, kept because plugins imported :class:`ApiError` from here
before :mod:`deploy_core.plugin` existed: the same objects as
:mod:`deploy_core.server.http.web`, whose names this module re-exports.  New code imports
``ApiError`` from :mod:`deploy_core.plugin`."""

from deploy_core.server.http.web import (
    MAX_BODY_BYTES,
    ApiError,
    flag_param,
    float_param,
    int_param,
    json_body,
    parse_model,
    record_or_404,
    services,
    validation_detail,
)

__all__ = [
    "MAX_BODY_BYTES",
    "ApiError",
    "flag_param",
    "float_param",
    "int_param",
    "json_body",
    "parse_model",
    "record_or_404",
    "services",
    "validation_detail",
]
