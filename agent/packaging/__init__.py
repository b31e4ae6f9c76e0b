"""Model packaging: Lookout for Vision's StartModelPackagingJob, offline, producing Greengrass
model components from models in a local registry. Depends on the agent core, never the reverse.
See docs/packaging.md."""

from agent.packaging.api import Client, PackagingSettings
from agent.packaging.errors import (
    AccessDeniedException,
    ConflictException,
    InternalServerException,
    LookoutVisionError,
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    ThrottlingException,
    ValidationException,
)
from agent.packaging.recipe import model_component_recipe, render_json, render_yaml

__all__ = [
    "Client",
    "PackagingSettings",
    "LookoutVisionError",
    "AccessDeniedException",
    "ConflictException",
    "InternalServerException",
    "ResourceNotFoundException",
    "ServiceQuotaExceededException",
    "ThrottlingException",
    "ValidationException",
    "model_component_recipe",
    "render_json",
    "render_yaml",
]
