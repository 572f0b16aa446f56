"""Where people already chat and route: the LiteLLM callback (``wattgate.integrations.litellm``)."""
