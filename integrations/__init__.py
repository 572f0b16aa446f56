"""Where people already chat and route: LiteLLM's callback (``wattgate.integrations.litellm``) and
Open WebUI's Filter (``open_webui_filter.py``, pasted into Open WebUI: it imports nothing of wattgate's)."""
