from bonefrac.cli.main import main

main()
