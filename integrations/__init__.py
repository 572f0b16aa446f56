"""Where people already chat and route: the LiteLLM callback (``wattgate.integrations.litellm``) and
the Open WebUI filter (``open_webui_filter.py``, a file to import on Open WebUI's Functions page)."""
