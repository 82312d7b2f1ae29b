"""Other APIs' dialects, translated at the edge onto the one Pipeline.

Each dialect is a package with its protocol models, its request/response
translation, its stream event builders and (Responses only) its state. A
dialect turns its request into a `Call` on a pipeline endpoint (chat
completions), runs the pipeline, and turns the `Outcome` back into its own
shapes; cache, limits, routing and metering see one path.
"""
