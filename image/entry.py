"""The frozen program's entry point: the same `donjon` command as the console script."""

from appliance.entry import main

main()
