from hipbatch.cli import main

main()
