from inferoute.cli import main

main()
