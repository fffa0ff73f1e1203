from blrdeploy.cli import main

main()
