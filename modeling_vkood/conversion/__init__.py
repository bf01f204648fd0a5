"""Conversion of checkpoints released by other projects (METER, the VK-OOD authors') into vkood models."""
