from elastiserve.cli.main import main

main()
