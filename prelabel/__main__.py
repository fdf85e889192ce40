from prelabel.cli import main

main()
