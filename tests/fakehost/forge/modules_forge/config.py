"""modules_forge.config: extensions Forge never loads."""
always_disabled_extensions = ["sd-webui-controlnet", "multidiffusion-upscaler-for-automatic1111", "forge_space_example"]
