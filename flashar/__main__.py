from flashar.cli import main

main()
